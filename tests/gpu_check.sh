#!/usr/bin/env bash
# What to run first on one GPU (≤ 10 minutes): bash tests/gpu_check.sh [REPORT]
# REPORT defaults to gpu_check_report.md (its JSON twin beside it); further arguments go to tests/gpu_check.py
# (e.g. --quick, --shapes smollm2, --device cuda:1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"   # $PYTHON, else the project's .venv, else python3
if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; fi
export HF_HUB_OFFLINE=1
OUT="${1:-gpu_check_report.md}"
if [ "$#" -gt 0 ]; then shift; fi
status=0
"$PY" "$ROOT/tests/gpu_check.py" --out "$OUT" "$@" || status=$?
if [ -f "$OUT" ]; then echo "GPU check report: $OUT"; else echo "GPU check wrote no report (exit $status)" >&2; fi
exit "$status"
