#!/usr/bin/env bash
# What to run first on one GPU (≤ 10 minutes): bash tests/gpu_check.sh [REPORT]
# REPORT defaults to gpu_check_report.md (its JSON twin beside it); further arguments go to tests/gpu_check.py
# (e.g. --quick, --shapes smollm2, --device cuda:1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=python3
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; fi
export HF_HUB_OFFLINE=1
OUT="${1:-gpu_check_report.md}"
if [ "$#" -gt 0 ]; then shift; fi
status=0
"$PY" "$ROOT/tests/gpu_check.py" --out "$OUT" "$@" || status=$?
echo "GPU check report: $OUT"
exit "$status"
