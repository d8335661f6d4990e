"""fp32 against bf16 on this CPU, side by side: training step time, evaluation time, per-row prediction agreement.

What `dtype="auto"` buys (or costs) on the machine at hand. One `cpu`-profile `lora` run is trained twice, once
per dtype (same seed, same rows), alternating; then the fp32-trained adapter is evaluated on a bf16 base and on
an fp32 base, alternating over repeats, under the generate and loglik protocols, and the per-row correctness of
the two evaluations is compared. Not a pytest test.

Run: HF_HUB_OFFLINE=1 ALIGNLORA_DATA=../shared/data .venv/bin/python tests/bench_dtype.py [--rows 30] [--repeats 2]
"""
import argparse, os, statistics, sys, tempfile, time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from alignlora.adapters import add_adapters, load_adapters
from alignlora.data import PAPER_TASKS
from alignlora.eval import evaluate
from alignlora.experiments import get_profile, make_spec, run, runs_dir
from alignlora.methods import get_method
from alignlora.models import BF16_CPU_FLAGS, cpu_flags, load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=30, help="evaluation rows per task")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the cpu profile's)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    p = get_profile("cpu")
    runs = Path(tempfile.mkdtemp(prefix="bench-dtype-"))
    specs = {dt: replace(make_spec(p, "lora", PAPER_TASKS), dtype=dt, max_steps=a.steps or p.max_steps)
             for dt in ("float32", "bfloat16")}
    train_s = {}
    for dt, s in specs.items():          # train each once: wall time and tokens/s from the run's metrics
        t0 = time.perf_counter(); run(s, runs_dir_=runs); train_s[dt] = time.perf_counter() - t0
    import json
    tps = {dt: json.loads((runs_dir(runs) / s.key / "train" / "metrics.json").read_text())["tokens_per_s"]
           for dt, s in specs.items()}
    ref = specs["float32"]

    def model_in(dt):
        m, tok = load_model(ref.model, dtype=getattr(torch, dt))
        add_adapters(m, get_method(ref.method), target_modules=ref.target_modules)
        load_adapters(m, runs_dir(runs) / ref.key / "train" / "adapters")
        return m.eval(), tok

    models = {dt: model_in(dt) for dt in specs}
    evals = {"generate": list(PAPER_TASKS), "loglik": [t for t in PAPER_TASKS if t != "gsm8k"]}
    times = {(dt, pr): [] for dt in specs for pr in evals}; preds = {}
    for _ in range(a.repeats):
        for pr, tasks in evals.items():
            for dt, (m, tok) in models.items():
                t0 = time.perf_counter()
                res = evaluate(m, tok, tasks, pr, limit=a.rows, max_new_tokens=p.label_max_new_tokens,
                               batch_size=p.eval_batch_size, progress=False)
                times[dt, pr].append(time.perf_counter() - t0)
                preds[dt, pr] = {(t, i): c for t in tasks for i, c in res[t]["per_example"]}
    units = sorted(set(BF16_CPU_FLAGS) & cpu_flags()) or ["none"]
    print(f"{ref.model}, cpu profile lora, bf16 units: {', '.join(units)}; threads {torch.get_num_threads()}; "
          f"{a.rows} rows per task, {a.repeats} repeats (medians)")
    print("| what | fp32 | bf16 | fp32 / bf16 |\n|---|---|---|---|")
    print(f"| training wall s ({ref.max_steps} steps) | {train_s['float32']:.1f} | {train_s['bfloat16']:.1f} | "
          f"{train_s['float32'] / train_s['bfloat16']:.2f} |")
    print(f"| training real tokens/s | {tps['float32']:.0f} | {tps['bfloat16']:.0f} | {tps['float32'] / tps['bfloat16']:.2f} |")
    for pr in evals:
        f, b = statistics.median(times["float32", pr]), statistics.median(times["bfloat16", pr])
        same = sum(preds["float32", pr][k] == preds["bfloat16", pr][k] for k in preds["float32", pr])
        print(f"| eval {pr} s | {f:.1f} | {b:.1f} | {f / b:.2f} |  (same correctness on {same}/{len(preds['float32', pr])} rows)")
    for pr in evals:
        diff = [k for k in preds["float32", pr] if preds["float32", pr][k] != preds["bfloat16", pr][k]]
        if diff: print(f"{pr}: rows whose correctness differs (task, id): {diff}")


if __name__ == "__main__":
    main()
