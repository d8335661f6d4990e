"""Speed of our adapters vs stock PEFT LoRA on SmolLM2-135M, CPU, in one run (not a pytest test).

Prints median wall-clock ratios of interleaved repeats (the CPU is shared, so every repeat times all variants
back to back and the median of the per-repeat ratios is reported):
  - training step (forward + backward + AdamW step): ours `lora` / PEFT LoRA r8   (target <= 1.05)
  - training step: `m-lora` / ours `lora`, `hydralora` / ours `lora`              (target <= 1.15)
  - merged inference latency (no_grad forward): ours `lora` merged / base model   (target <= 1.01)

Run: HF_HUB_OFFLINE=1 .venv/bin/python tests/bench_adapters.py [--repeats 7] [--batch 4] [--seq 64]
"""
import argparse, os, statistics, sys, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--infer-iters", type=int, default=3, help="forwards per timed inference sample")
    a = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from alignlora.adapters import add_adapters, merge_adapters
    from alignlora.models import load_model

    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (a.batch, a.seq))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    targets = ["gate_proj", "up_proj", "down_proj"]

    def fresh(): return load_model(a.model)[0]
    models = {
        "peft-lora": get_peft_model(fresh(), LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=targets)),
        "lora": add_adapters(fresh(), "lora"),
        "m-lora": add_adapters(fresh(), "m-lora"),
        "hydralora": add_adapters(fresh(), "hydralora"),
    }
    opts = {}
    for k, m in models.items():
        m.train()
        opts[k] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    def train_step(k):
        m, opt = models[k], opts[k]
        t0 = time.perf_counter()
        loss = m(**batch).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for k in models: train_step(k)                 # warm-up (allocator, kernels)
    times = {k: [] for k in models}
    for rep in range(a.repeats):
        order = list(models) if rep % 2 == 0 else list(reversed(models))   # alternate order against drift
        for k in order: times[k].append(train_step(k))
    for k in models: del opts[k]

    # merged inference vs the base model
    base = fresh().eval()
    merged = merge_adapters(add_adapters(fresh(), "lora")).eval()
    inf = dict(input_ids=ids, attention_mask=torch.ones_like(ids))

    @torch.no_grad()
    def infer(m):
        t0 = time.perf_counter()
        for _ in range(a.infer_iters): m(**inf)
        return (time.perf_counter() - t0) / a.infer_iters

    infer(base); infer(merged)
    itimes = {"base": [], "merged": []}
    for rep in range(2 * a.repeats):
        pair = [("base", base), ("merged", merged)] if rep % 2 == 0 else [("merged", merged), ("base", base)]
        for k, m in pair: itimes[k].append(infer(m))

    def ratio(num, den, t):   # median over repeats of the per-repeat ratio (both timed back to back)
        return statistics.median(x / y for x, y in zip(t[num], t[den]))

    print(f"# {a.model}, CPU ({torch.get_num_threads()} threads), batch {a.batch} x {a.seq} tokens, "
          f"{a.repeats} interleaved repeats, torch {torch.__version__}")
    for k, v in times.items(): print(f"train step {k:>10}: median {statistics.median(v)*1e3:7.1f} ms")
    for k, v in itimes.items(): print(f"inference {k:>11}: median {statistics.median(v)*1e3:7.1f} ms")
    rows = [("ours lora / PEFT lora (train step)", ratio("lora", "peft-lora", times), 1.05),
            ("m-lora / lora (train step)", ratio("m-lora", "lora", times), 1.15),
            ("hydralora / lora (train step)", ratio("hydralora", "lora", times), 1.15),
            ("merged lora / base (inference)", ratio("merged", "base", itimes), 1.01)]
    for name, r, target in rows:
        print(f"{name:<38} {r:6.3f}   target <= {target:.2f}   {'ok' if r <= target else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
