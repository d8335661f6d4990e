"""Training throughput on the paper's 5-task mix (issue 9), in one run on the same batches (not a pytest test).

For each variant, forward + backward of the same balanced micro-batches (10 rows = 2 per task, max_length 512):
  - `peft+padded`: stock PEFT LoRA r=8 (gate/up/down), padded batch, full logits (transformers' own loss)
  - ours `lora`, `m-lora`, `hydralora`, `align-lora-kl` through `AlignTrainer.compute_loss`, packed batch +
    supervised-only logits + one causal attention per packed sequence (the `train` defaults); plus ours `lora`
    padded + full logits (the switches turned off) and `lora+masked` (packed, attention over the block-diagonal mask)
Prints real (non-padding) tokens/s, the ratio to PEFT, the achieved matmul FLOP/s counted from the model's shapes on
the real tokens (frozen base: forward + input-gradient = 2 × forward matmuls; adapters and LM head counted where
computed) as a fraction of `torch.mm`'s peak measured in the same run, and peak memory (CPU: peak RSS of the process,
all variants resident, reset per variant through /proc/self/clear_refs; CUDA: max_memory_allocated, one model at a
time). Variants are interleaved per repeat
(the CPU is shared), medians reported.

With a GPU (`--device cuda`), `--model qwen2.5-3b-shape` builds Qwen2.5-3B's architecture with random bf16 weights
and reports the same figures against the measured bf16 matmul peak (MFU).

Run: HF_HUB_OFFLINE=1 ALIGNLORA_DATA=../shared/data .venv/bin/python tests/bench_throughput.py [--steps 2]
"""
import argparse, os, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


# rows 0-3 of every paper task, tokenised by SmolLM2's tokenizer (qnli/piqa/winogrande/arc/gsm8k): length:supervised
SYNTHETIC = "62:4,74:6,79:6,71:6/103:3,55:3,251:3,70:3/67:3,63:3,62:3,63:3/61:2,95:2,61:2,73:2/186:115,258:169,135:64,133:64"


def synthetic_features(profile, vocab, seed=0):
    "Task-ordered lists of encoded rows with random ids, prompt labels −100, from a 'len:sup,.../...' profile."
    g = torch.Generator().manual_seed(seed)
    out = []
    for t, task in enumerate(profile.split("/")):
        rows = []
        for item in task.split(","):
            n, sup = map(int, item.split(":"))
            ids = torch.randint(3, vocab, (n,), generator=g).tolist()
            rows.append(dict(input_ids=ids, labels=[-100] * (n - sup) + ids[n - sup:], task_id=t))
        out.append(rows)
    return out


def mm_peak(device, dtype, n=2048, reps=5):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(reps):
        sync(device); t = time.perf_counter(); torch.mm(a, b); sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def sync(device):
    if str(device).startswith("cuda"): torch.cuda.synchronize()


def reset_peak(device):
    if str(device).startswith("cuda"): torch.cuda.reset_peak_memory_stats()
    else:
        try: Path("/proc/self/clear_refs").write_text("5")
        except OSError: pass


def peak_bytes(device):
    if str(device).startswith("cuda"): return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"): return int(line.split()[1]) * 1024
    return 0


def matmul_flops(cfg, rows_lens, sup_tokens, lm_head_tokens, r=8, heads=1, adapted=True):
    "Useful matmul FLOPs of forward + input-gradient backward on the real tokens (frozen base)."
    h, i, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    nh, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = h // nh
    tok = sum(rows_lens)
    proj = 2 * tok * L * (h * h + 2 * h * kv * hd + h * h + 3 * h * i)          # q, k, v, o, gate, up, down
    attn = sum(2 * 2 * L * h * n * (n + 1) / 2 for n in rows_lens)              # QK^T and PV, causal, per sequence
    ada = 2 * tok * L * (r * (h + i) * 2 + r * heads * (i + h + i)) if adapted else 0  # A and B of gate/up/down
    head = 2 * lm_head_tokens * h * V
    return 2 * (proj + attn + ada + head)                                      # forward + input gradient


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2, help="different micro-batches per variant per repeat")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variants", default="peft+padded,lora+padded,lora+masked,lora,m-lora,hydralora,align-lora-kl")
    ap.add_argument("--synthetic", nargs="?", const=SYNTHETIC, default=None,
                    help="random token ids with these per-task 'length:supervised' profiles (no data or tokenizer needed)")
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    dev = a.device

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments
    from alignlora.adapters import add_adapters
    from alignlora.data import PAPER_TASKS, load_task, encode_many
    from alignlora.methods import get_method
    from alignlora.models import load_model, model_config
    from alignlora.train import AlignTrainer, pack_collate, pad_collate

    if a.model == "qwen2.5-3b-shape":
        tok = None
        cfg = model_config("qwen2.5-3b")
        dtype = torch.bfloat16
        def fresh():
            torch.manual_seed(0)
            with torch.device(dev): m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
            return m
    else:
        dtype = torch.float32
        base, tok = load_model(a.model, device=dev); cfg = base.config
        def fresh(): return load_model(a.model, device=dev)[0]

    # the same balanced micro-batches for every variant: step s takes rows s*k .. s*k+k-1 of every task
    if a.synthetic or tok is None:
        per_task = synthetic_features(a.synthetic or SYNTHETIC, cfg.vocab_size)
    else:
        per_task = [[dict(f, task_id=i) for f in encode_many(load_task(t, "train", n=a.k * a.steps, seed=0), tok,
                                                            max_length=a.max_length)] for i, t in enumerate(PAPER_TASKS)]
    if not a.synthetic and tok is not None and any(len(r) < a.k * a.steps for r in per_task):
        raise SystemExit(f"need {a.k * a.steps} rows per task")
    feats = [[rows[(s * a.k + j) % len(rows)] for rows in per_task for j in range(a.k)] for s in range(a.steps)]
    pad_id = tok.pad_token_id if tok is not None else 0
    padded = [pad_collate(f, pad_id) for f in feats]
    packed = [pack_collate(f, pad_id) for f in feats]
    real = [int(b["attention_mask"].sum()) for b in padded]
    print(f"{a.model} on {dev}, {torch.get_num_threads()} threads; {a.steps} micro-batches of {len(feats[0])} rows: "
          f"real tokens {real}, padded {[int(b['input_ids'].numel()) for b in padded]} "
          f"({sum(real) / sum(b['input_ids'].numel() for b in padded):.0%} real)")

    targets = ["gate_proj", "up_proj", "down_proj"]
    models, trainers = {}, {}

    def build(v):
        if v == "peft+padded":
            models[v] = get_peft_model(fresh(), LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=targets))
            return
        name = v.removesuffix("+padded").removesuffix("+masked")
        m = fresh(); torch.manual_seed(0); meth = get_method(name); add_adapters(m, meth)
        m.alignlora_method = meth
        models[v] = m
        targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(feats[0]), report_to=[],
                                  use_cpu=dev == "cpu", bf16=dtype == torch.bfloat16)
        trainers[v] = AlignTrainer(model=m, args=targs, task_sizes=[a.k] * len(PAPER_TASKS), align=meth.align,
                                   align_lambda=meth.align_lambda or 0.0, pack=not v.endswith("+padded"),
                                   supervised_logits=not v.endswith("+padded"), processing_class=tok,
                                   per_sequence_attention=not v.endswith("+masked"))
        if tok is None: trainers[v].pad_token_id = pad_id

    def step(v, s):
        m = models[v]; m.train()
        if v == "peft+padded":
            b = {k: x.to(dev) for k, x in padded[s].items() if k in ("input_ids", "attention_mask", "labels")}
            with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                loss = m(**b).loss
        else:
            b = {k: x.to(dev) for k, x in (padded if v.endswith("+padded") else packed)[s].items()}
            with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                loss = trainers[v].compute_loss(m, b, num_items_in_batch=b["shift_labels"].ne(-100).sum())
        loss.backward(); m.zero_grad(set_to_none=True)

    def timed(v):
        reset_peak(dev); sync(dev); t = time.perf_counter()
        for s in range(a.steps): step(v, s)
        sync(dev); times[v].append(time.perf_counter() - t); mem[v] = max(mem[v], peak_bytes(dev))

    variants = a.variants.split(",")
    peak = mm_peak(dev, dtype)
    times = {v: [] for v in variants}; mem = {v: 0 for v in variants}; info = {}
    if str(dev).startswith("cuda"):      # one model at a time on the GPU (memory), repeats back to back
        for v in variants:
            build(v); step(v, 0)
            for _ in range(a.repeats): timed(v)
            info[v] = getattr(models[v], "alignlora_method", None)
            del models[v]; trainers.pop(v, None); torch.cuda.empty_cache()
    else:                                # all resident, interleaved per repeat (the CPU is shared)
        for v in variants: build(v); step(v, 0); info[v] = getattr(models[v], "alignlora_method", None)
        for _ in range(a.repeats):
            for v in variants: timed(v)
    print(f"measured torch.mm peak ({dtype}): {peak / 1e9:.1f} GFLOP/s")
    ref = statistics.median(times["peft+padded"]) if "peft+padded" in times else None
    lora_t = statistics.median(times["lora"]) if "lora" in times else None
    print(f"{'variant':16s} {'s/step':>8s} {'real tok/s':>11s} {'vs PEFT':>8s} {'vs lora':>8s} {'useful GFLOP/s':>15s} {'of mm peak':>10s} {'peak mem':>10s}")
    for v, ts in times.items():
        t = statistics.median(ts)
        meth = info[v]
        heads = meth.adapter.heads if meth else 1
        r = meth.adapter.r if meth else 8
        sup = sum(int(b["shift_labels"].ne(-100).sum()) for b in padded)
        head_tok = sup if v != "peft+padded" and not v.endswith("+padded") else sum(b["input_ids"].numel() for b in padded)
        lens = [n for f in feats for n in (len(x["input_ids"]) for x in f)]
        fl = matmul_flops(cfg, lens, sup, head_tok, r=r, heads=heads)
        print(f"{v:16s} {t / a.steps:8.2f} {sum(real) / t:11.1f} {(ref / t if ref else float('nan')):8.2f} "
              f"{(t / lora_t if lora_t else float('nan')):8.3f} {fl / t / 1e9:15.1f} {fl / t / peak:10.0%} {mem[v] / 2**30:9.2f}G")


if __name__ == "__main__":
    main()
