"""Step time and peak memory of alignment over the optimizer step, against `lora` at the same rows per step.

One optimizer step's forward + backward (no optimiser update) through `AlignTrainer`'s own step machinery
(`get_batch_samples` + `training_step`), on the same 8 rows per task of the 5-task mix, two ways:
  - `GA=g`: micro-batches of k rows per task, accumulated g times: the alignment loss needs the no-grad pre-pass;
  - `GA=1`: one micro-batch of k·g rows per task (packed into one row): no pre-pass, larger activations.
Variants are interleaved per repeat (the CPU is shared) and medians reported; peak memory is the process's peak RSS,
reset before each variant through /proc/self/clear_refs (CPU), or CUDA max_memory_allocated. Not a pytest test.

Run: HF_HUB_OFFLINE=1 ALIGNLORA_DATA=../shared/data .venv/bin/python tests/bench_align_step.py [--repeats 3] [--checkpointing]
"""
import argparse, os, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import TrainingArguments

from alignlora.adapters import add_adapters
from alignlora.data import PAPER_TASKS, encode_many, load_task
from alignlora.methods import get_method
from alignlora.models import load_model
from alignlora.train import AlignTrainer, pack_collate, segment_attention


def reset_peak():
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats(); return
    try: Path("/proc/self/clear_refs").write_text("5")
    except OSError: pass

def peak_mb():
    if torch.cuda.is_available(): return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=2, help="rows per task per micro-batch in the accumulated variants")
    ap.add_argument("--ga", type=int, default=4, help="micro-batches per step in the accumulated variants")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="lora,align-lora-kl,align-lora-mmd")
    ap.add_argument("--checkpointing", action="store_true",
                    help="gradient checkpointing on (non-reentrant), as the paper profile trains")
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, tok = load_model(a.model)
    per_task = [[dict(f, task_id=i) for f in encode_many(load_task(t, "train", n=4 * a.k * a.ga, seed=0), tok,
                                                          max_length=a.max_length, skip_long=True)[: a.k * a.ga]]
                for i, t in enumerate(PAPER_TASKS)]
    micro = [[f for p in per_task for f in p[a.k * j:a.k * (j + 1)]] for j in range(a.ga)]
    layouts = {f"GA={a.ga}": ([pack_collate(mb, tok.pad_token_id) for mb in micro], a.k, a.ga),
               "GA=1": ([pack_collate([f for mb in micro for f in mb], tok.pad_token_id)], a.k * a.ga, 1)}
    tokens = sum(len(f["input_ids"]) for mb in micro for f in mb)
    models, trainers = {}, {}
    for name in a.methods.split(","):
        m, _ = load_model(a.model); torch.manual_seed(0); meth = get_method(name); add_adapters(m, meth)
        m.alignlora_method = meth; models[name] = m
        if a.checkpointing: m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for lay, (_, k, ga) in layouts.items():
            args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=k * len(PAPER_TASKS),
                                     gradient_accumulation_steps=ga, report_to=[], use_cpu=not torch.cuda.is_available())
            trainers[name, lay] = AlignTrainer(model=m, args=args, task_sizes=[a.k * a.ga] * len(PAPER_TASKS),
                                               align=meth.align, align_lambda=meth.align_lambda, processing_class=tok)

    def step(name, lay):
        m, tr, (batches, _, ga) = models[name], trainers[name, lay], layouts[lay]
        m.zero_grad(); reset_peak(); t0 = time.perf_counter()
        with segment_attention(m):
            got, n = tr.get_batch_samples(iter(batches), ga, tr.args.device)
            for b in got: tr.training_step(m, b, n)
        return time.perf_counter() - t0, peak_mb()

    variants = list(trainers)
    for v in variants: step(*v)                      # warm-up, one step each
    times = {v: [] for v in variants}; mem = {v: 0.0 for v in variants}
    for _ in range(a.repeats):
        for v in variants:
            s, p = step(*v); times[v].append(s); mem[v] = max(mem[v], p)
    ref = {lay: statistics.median(times["lora", lay]) for lay in layouts}
    print(f"{a.model}, {len(PAPER_TASKS)} tasks x {a.k * a.ga} rows per step ({tokens} real tokens), "
          f"{a.repeats} repeats, medians; threads {torch.get_num_threads()}; "
          f"gradient checkpointing {'on' if a.checkpointing else 'off'}")
    print("| method | layout | s/step | spread | vs lora, same layout | vs lora GA=1 | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for (name, lay) in variants:
        t = statistics.median(times[name, lay])
        print(f"| {name} | {lay} | {t:.2f} | {min(times[name, lay]):.2f}–{max(times[name, lay]):.2f} | "
              f"{t / ref[lay]:.3f} | {t / ref['GA=1']:.3f} | {mem[name, lay]:.0f} |")


if __name__ == "__main__":
    main()
