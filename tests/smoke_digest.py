"""The numbers of every smoke-profile table, for checking that a change alters none of them.

Runs the whole paper with the `smoke` profile into OUT and writes OUT/digest.json: each table's CSV without the
columns that measure time or memory (those differ between any two runs). Run it on two commits and compare:

    ALIGNLORA_DATA=../shared/data HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONHASHSEED=0 \\
        .venv/bin/python tests/smoke_digest.py /tmp/before      # on the old commit
    ... /tmp/after                                               # on the new one
    cmp /tmp/before/digest.json /tmp/after/digest.json
"""
import json, sys
from pathlib import Path

from alignlora.experiments import reproduce, read_table

MEASURED = ("wall", "_s", "sec", "time", "tok_s", "per_s", "rss", "mb", "peak", "latency", "step_s", "ratio")
NOT_NUMBERS_OF_THE_PAPER = ("walltimes", "costs")   # tables of time and memory only


def digest(results: Path) -> dict:
    "Every table's CSV text with the time and memory columns dropped, by table name."
    out = {}
    for f in sorted(results.glob("*.csv")):
        if f.stem in NOT_NUMBERS_OF_THE_PAPER: continue
        df, _ = read_table(f)
        out[f.stem] = df[[c for c in df.columns if not any(t in c.lower() for t in MEASURED)]].to_csv(index=False)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2: sys.exit(__doc__)
    root = Path(sys.argv[1]); res = root / "results" / "smoke"
    reproduce("smoke", results_dir=res, runs_dir_=root / "runs", log=lambda *a: None)
    d = digest(res)
    (root / "digest.json").write_text(json.dumps(d, indent=1))
    print(f"{len(d)} tables → {root / 'digest.json'}")
