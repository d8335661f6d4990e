"""What to run first on one GPU (≤ 10 minutes): `bash tests/gpu_check.sh [REPORT]`.

Sections, each timed and guarded (a failing section is reported with its error, the others still run; the exit
code is non-zero if any section failed):
  1. environment: versions, device, CUDA capability, flash_attn / liger_kernel, measured `torch.mm` peak at the dtype
  2. a few training steps (bf16 base, or fp32 on a CPU without bf16 matrix units: `--dtype auto`) of every method preset (alignment included) at SmolLM2-135M and Qwen2.5-3B shape,
     random init from the shipped configs (no download), packed batches, `AlignTrainer`'s loss, fp32 adapters
  3. `segment_sdpa` (packed) vs stock `sdpa` on each sequence separately: logits and adapter gradients
  4. the varlen packed-attention kernels (`packed_attention_backend`) vs the loop: equality and ms per fwd+bwd
  5. one evaluation batch (`alignlora.eval.evaluate`, tiny model, a handful of rows; needs $ALIGNLORA_DATA)
  6. tokens/s and MFU of a training step (6·N·tokens / measured peak, N = non-embedding weights) beside stock PEFT LoRA (padded batch) and
     stock PEFT with liger-kernel's fused linear cross-entropy (where installed)
The report is Markdown (a table per section) with a JSON twin, both written atomically.

Run: HF_HUB_OFFLINE=1 .venv/bin/python tests/gpu_check.py [--device cuda] [--quick] [--out gpu_check_report.md]
"""
import argparse, copy, gc, importlib.util, json, math, os, platform, statistics, sys, tempfile, time, traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F

SHAPES = {"smollm2": "smollm2-135m", "qwen2.5-3b": "qwen2.5-3b"}   # --shapes name → models-registry name
QUICK_LAYERS = {"smollm2": 2, "qwen2.5-3b": 1}
# per task 'length:supervised' rows (tests/bench_throughput.py's synthetic rows): 2 rows of each of 2 tasks (quick),
# 2 rows of each of the paper's 5 tasks (full)
QUICK_PROFILE = "40:6,28:4/36:3,44:5"
FULL_PROFILE = "62:4,74:6/103:3,55:3/67:3,63:3/61:2,95:2/186:115,258:169"
TOL = {"float32": 1e-4, "bfloat16": 3e-2}   # relative (‖Δ‖/‖ref‖) bound on logits and gradients, per dtype


_TMP = tempfile.TemporaryDirectory(prefix="alignlora-gpu-check-")   # the Trainers' output_dir (nothing is saved)


def free(device):
    "Release what the last model left on the device."
    gc.collect()
    if torch.device(device).type == "cuda": torch.cuda.empty_cache()


def sync(device):
    if torch.device(device).type == "cuda": torch.cuda.synchronize()


def timed_median(fn, device, warmup=1, reps=3) -> float:
    "Median seconds of `fn()` over `reps` synchronised runs after `warmup` runs."
    for _ in range(warmup): fn()
    ts = []
    for _ in range(reps):
        sync(device); t = time.perf_counter(); fn(); sync(device); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


class Skip(Exception):
    "A section (or row) that cannot run here, with the reason."


# ---------------------------------------------------------------------------------------------------- building blocks
def base_model(shape: str, device, dtype, quick: bool):
    "The shape's architecture from the shipped config, random init, materialised on `device` in `dtype` (sdpa)."
    from transformers import AutoModelForCausalLM
    from alignlora.models import model_config
    cfg = model_config(SHAPES[shape])
    if quick: cfg.num_hidden_layers = QUICK_LAYERS[shape]
    torch.manual_seed(0)
    with torch.device(device): m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return m


def batches(vocab: int, quick: bool):
    "One balanced micro-batch of random-token rows, packed and padded, and its rows per task (k)."
    from bench_throughput import synthetic_features
    from alignlora.train import pack_collate, pad_collate
    per_task = synthetic_features(QUICK_PROFILE if quick else FULL_PROFILE, vocab)
    feats = [f for rows in per_task for f in rows]
    return pack_collate(feats, 0), pad_collate(feats, 0), len(per_task[0]), len(per_task), feats


def trainer_for(model, method, k: int, n_tasks: int, device, bf16: bool = True):
    "`AlignTrainer` for the method's loss (packed, supervised-only logits, per-sequence attention), as `train` builds it."
    from transformers import TrainingArguments
    from alignlora.train import AlignTrainer
    args = TrainingArguments(output_dir=_TMP.name, per_device_train_batch_size=k * n_tasks, report_to=[],
                             use_cpu=torch.device(device).type == "cpu", bf16=bf16)
    tr = AlignTrainer(model=model, args=args, task_sizes=[k] * n_tasks, align=method.align,
                      align_lambda=method.align_lambda or 0.0, pack=True, processing_class=None)
    tr.pad_token_id = 0
    return tr


def with_method(base, method_name: str, **overrides):
    "A copy of `base` with the method's seeded adapters (fp32 masters on a bf16 base, as `train` does)."
    from alignlora.adapters import add_adapters
    from alignlora.methods import get_method
    m = copy.deepcopy(base); meth = get_method(method_name, **overrides)
    torch.manual_seed(0); add_adapters(m, meth); m.alignlora_method = meth
    return m, meth


def to_device(b: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def loss_of(tr, model, b):
    "The project's micro-batch loss under the Trainer's autocast."
    with tr.compute_loss_context_manager():
        return tr.compute_loss(model, b, num_items_in_batch=b["shift_labels"].ne(-100).sum())


def matmul_params(base) -> int:
    "N of 6·N·tokens: the non-embedding weights (every Linear of the base but the LM head), no adapters."
    head = base.get_output_embeddings()
    return sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not head)


# ---------------------------------------------------------------------------------------------------------- sections
def env_section(a, ctx) -> list[dict]:
    import peft, transformers
    dev = torch.device(a.device)
    rows = [dict(item="python", value=platform.python_version()), dict(item="torch", value=torch.__version__),
            dict(item="transformers", value=transformers.__version__), dict(item="peft", value=peft.__version__)]
    if dev.type == "cuda":
        rows += [dict(item="device", value=torch.cuda.get_device_name(dev)),
                 dict(item="CUDA capability", value=".".join(map(str, torch.cuda.get_device_capability(dev)))),
                 dict(item="CUDA (torch build)", value=torch.version.cuda)]
    else: rows.append(dict(item="device", value=f"{dev.type} ({platform.processor() or platform.machine()}, "
                                                f"{torch.get_num_threads()} threads)"))
    for pkg in ("flash_attn", "liger_kernel"):
        rows.append(dict(item=f"{pkg} importable", value=importlib.util.find_spec(pkg) is not None))
    from alignlora.train import packed_attention_backend
    rows.append(dict(item="packed attention (auto)", value=packed_attention_backend(dev)))
    rows.append(dict(item="training dtype", value=str(a.dtype).removeprefix("torch.")))
    n = 512 if a.quick else 4096
    x, y = (torch.randn(n, n, device=dev, dtype=a.dtype) for _ in range(2))
    t = timed_median(lambda: torch.mm(x, y), dev, warmup=2, reps=5 if a.quick else 10)
    ctx["peak"] = 2 * n ** 3 / t
    rows.append(dict(item=f"{str(a.dtype).removeprefix('torch.')} torch.mm peak ({n}², median)",
                     value=f"{ctx['peak'] / 1e12:.3f} TFLOP/s"))
    return rows


def steps_section(a, ctx) -> list[dict]:
    "A few optimizer steps (base at the training dtype) of every method preset at every shape, on one packed micro-batch."
    from alignlora.methods import METHODS
    from alignlora.train import PAPER_TRAINING
    rows, bad = [], []
    for shape in a.shapes:
        base = base_model(shape, a.device, a.dtype, a.quick)
        packed, _, k, n_tasks, _ = batches(base.config.vocab_size, a.quick)
        b = to_device(packed, a.device)
        for name in METHODS:
            row = dict(shape=shape, layers=base.config.num_hidden_layers, method=name)
            m = tr = opt = None
            try:
                m, meth = with_method(base, name); m.train()
                tr = trainer_for(m, meth, k, n_tasks, a.device, bf16=a.dtype == torch.bfloat16)
                params = [p for p in m.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=PAPER_TRAINING["learning_rate"])
                losses, t0 = [], time.perf_counter()
                for _ in range(a.steps):
                    loss = loss_of(tr, m, b); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                sync(a.device)
                fp32 = all(p.dtype == torch.float32 for p in params)
                finite = all(math.isfinite(x) for x in losses)
                row.update(loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), finite=finite,
                           decreased=losses[-1] < losses[0], adapters_fp32=fp32, adapter_params=sum(p.numel() for p in params),
                           s_per_step=round((time.perf_counter() - t0) / a.steps, 3), status="ok" if finite and fp32 else "failed")
            except Exception as e:
                row.update(status="failed", error=f"{type(e).__name__}: {e}")
            del m, tr, opt; free(a.device)
            if row["status"] != "ok": bad.append(f"{shape}/{name}")
            rows.append(row)
        del base; free(a.device)
    if bad: raise SectionFailed(f"not finite, not fp32 adapters, or an error: {bad}", rows)
    return rows


class SectionFailed(Exception):
    "A section that ran and found a problem: its rows still go into the report."
    def __init__(self, msg, rows): super().__init__(msg); self.rows = rows


def sdpa_section(a, ctx) -> list[dict]:
    "Packed micro-batch through `segment_sdpa` vs each sequence alone through stock sdpa: logits and adapter grads."
    from alignlora.train import segment_attention, unpack, IGNORE
    shape = a.shapes[0]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        base = base_model(shape, a.device, dtype, True)   # a few layers: the attention is what is compared
        m, _ = with_method(base, "lora", dropout=0.0)   # no dropout: both sides see the same network
        for p in m.parameters():                          # B = 0 at init: give every adapter weight a value
            if p.requires_grad: torch.nn.init.normal_(p, std=0.02)
        m.train()
        packed, _, _, _, feats = batches(m.config.vocab_size, True)
        b = to_device(packed, a.device)
        params = [p for p in m.parameters() if p.requires_grad]
        def grads():
            g = torch.cat([p.grad.flatten().float() for p in params]); m.zero_grad(set_to_none=True); return g
        with segment_attention(m, backend="loop") as on:
            assert on, "the model is not on sdpa attention"
            lp = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                   cu_seq_lens_q=b["cu_seq_lens"], use_cache=False).logits
        F.cross_entropy(lp.flatten(0, 1).float(), b["shift_labels"].flatten(), ignore_index=IGNORE, reduction="sum").backward()
        g_packed, lp = grads(), unpack(lp.detach(), b["unpack_index"])
        sep = []
        for f in feats:                                   # stock sdpa, one sequence at a time, no mask, no padding
            ids = torch.tensor([f["input_ids"]], device=a.device); lab = torch.tensor([f["labels"]], device=a.device)
            lo = m(input_ids=ids, use_cache=False).logits
            F.cross_entropy(lo[0, :-1].float(), lab[0, 1:], ignore_index=IGNORE, reduction="sum").backward()
            sep.append(lo.detach()[0])
        g_sep = grads()
        um = b["unpack_mask"]
        ref = torch.cat(sep); got = lp[um]
        tol = TOL[str(dtype).removeprefix("torch.")]
        row = dict(dtype=str(dtype).removeprefix("torch."), shape=shape, sequences=len(feats),
                   logits_max_abs=f"{(got - ref).abs().max().item():.2e}", logits_rel=f"{rel(got, ref):.2e}",
                   grads_max_abs=f"{(g_packed - g_sep).abs().max().item():.2e}", grads_rel=f"{rel(g_packed, g_sep):.2e}",
                   tolerance_rel=tol)
        row["status"] = "ok" if rel(got, ref) <= tol and rel(g_packed, g_sep) <= tol else "failed"
        rows.append(row)
        del base, m; free(a.device)
    if any(r["status"] != "ok" for r in rows): raise SectionFailed("segment_sdpa differs from stock sdpa beyond tolerance", rows)
    return rows


def varlen_section(a, ctx) -> list[dict]:
    "Each packed-attention kernel vs the loop on one packed stream at the shapes' head layouts; ms per fwd+bwd."
    from alignlora.models import model_config
    from alignlora.train import segment_sdpa, segment_flex, segment_fa2, flex_available
    dev = torch.device(a.device); cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tol = TOL[str(dtype).removeprefix("torch.")]
    fns = dict(loop=segment_sdpa, flex=segment_flex, flash_attention_2=segment_fa2)
    rows = []
    for shape in a.shapes:
        cfg = model_config(SHAPES[shape])
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads; D = cfg.hidden_size // H
        lens = [int(x.split(":")[0]) for t in (QUICK_PROFILE if a.quick else FULL_PROFILE).split("/") for x in t.split(",")]
        bounds = [0]
        for n in lens: bounds.append(bounds[-1] + n)
        T = bounds[-1]; cu = torch.tensor(bounds, dtype=torch.int32, device=dev); cu.host_bounds = bounds
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, h, T, D, device=dev, dtype=dtype, generator=g) for h in (H, KV, KV))
        mod = torch.nn.Module()                         # the calling convention's `module` (train mode)
        def run(name, grad=True):
            xs = [x.detach().clone().requires_grad_(grad) for x in (q, k, v)]
            out = fns[name](mod, *xs, None, scaling=D ** -0.5, cu_seq_lens_q=cu)[0]
            if grad: out.float().square().sum().backward()
            return out.detach(), [x.grad for x in xs] if grad else None
        ref, ref_g = run("loop")
        for name in fns:
            row = dict(shape=shape, backend=name, dtype=str(dtype).removeprefix("torch."), tokens=T, sequences=len(lens),
                       heads=f"{H}/{KV}×{D}")
            if name == "flex" and not flex_available(): row.update(status="skipped", reason="no flex_attention in this torch")
            elif name == "flash_attention_2" and not (cuda and importlib.util.find_spec("flash_attn")):
                row.update(status="skipped", reason="needs CUDA and flash_attn (pip install flash-attn)")
            else:
                grad = cuda or name == "loop"               # this torch has no flex-attention backward on the CPU
                out, gr = run(name, grad)
                row.update(out_max_abs=f"{(out - ref).abs().max().item():.2e}", out_rel=f"{rel(out, ref):.2e}")
                ok = rel(out, ref) <= tol
                if grad and name != "loop":
                    gmax = max(rel(x, y) for x, y in zip(gr, ref_g)); row["grads_rel"] = f"{gmax:.2e}"; ok = ok and gmax <= tol
                elif not grad: row["grads_rel"] = "n/a (no CPU backward)"
                row["ms_fwd_bwd" if grad else "ms_fwd"] = round(1e3 * timed_median(lambda: run(name, grad), dev), 3)
                row.update(tolerance_rel=tol, status="ok" if ok else "failed")
            rows.append(row)
    if any(r["status"] == "failed" for r in rows): raise SectionFailed("a varlen kernel differs from the loop", rows)
    return rows


def eval_section(a, ctx) -> list[dict]:
    "The project's evaluation path on a handful of rows (tiny model, loglik on piqa)."
    data = os.environ.get("ALIGNLORA_DATA")
    if not data: raise Skip("evaluation reads its rows from $ALIGNLORA_DATA, which is not set (offline run)")
    from alignlora.eval import evaluate
    from alignlora.models import load_model
    model, tok = load_model("tiny", device=a.device)
    rows = []
    for protocol in ("loglik", "generate"):
        t0 = time.perf_counter()
        res = evaluate(model, tok, ["piqa"], protocol, limit=4, batch_size=4, max_new_tokens=8, progress=False,
                       data_dir=data)["piqa"]
        rows.append(dict(model="tiny", task="piqa", protocol=protocol, rows=res["n"], acc=round(res["acc"], 3),
                         seconds=round(time.perf_counter() - t0, 2), status="ok" if res["n"] == 4 else "failed"))
    if any(r["status"] != "ok" for r in rows): raise SectionFailed("evaluation did not score every row", rows)
    return rows


def throughput_section(a, ctx) -> list[dict]:
    "Tokens/s and MFU (6·N·real tokens over the measured peak at the training dtype) of ours vs stock PEFT (± liger FLCE)."
    from peft import LoraConfig, get_peft_model
    from alignlora.methods import get_method
    from alignlora.train import packed_attention_backend
    if "peak" not in ctx: raise Skip("no measured torch.mm peak (the environment section failed)")
    dev = torch.device(a.device); lora = get_method("lora").adapter
    rows, liger_todo = [], []
    def measure(row, step, real, n):
        t = timed_median(step, dev, warmup=1, reps=2 if a.quick else 5)
        row.update(ms_per_step=round(1e3 * t, 2), real_tokens=real, tokens_per_s=round(real / t, 1),
                   mfu=f"{6 * n * real / t / ctx['peak']:.1%}", status="ok" if real / t > 0 else "failed")
    def peft_model(base):
        return get_peft_model(copy.deepcopy(base), LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                               target_modules=list(lora.target_modules)))
    def peft_step(m, b):
        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == torch.bfloat16): loss = m(**b).loss
            loss.backward(); m.zero_grad(set_to_none=True)
        return step
    for shape in a.shapes:
        base = base_model(shape, dev, a.dtype, a.quick); n = matmul_params(base)
        packed, padded, k, n_tasks, _ = batches(base.config.vocab_size, a.quick)
        real = int(padded["attention_mask"].sum())
        m, meth = with_method(base, "lora"); m.train(); tr = trainer_for(m, meth, k, n_tasks, dev, bf16=a.dtype == torch.bfloat16)
        b = to_device(packed, dev)
        def ours():
            loss_of(tr, m, b).backward(); m.zero_grad(set_to_none=True)
        row = dict(shape=shape, layers=base.config.num_hidden_layers, variant="ours lora (packed, supervised logits)",
                   attention=packed_attention_backend(dev), N=n, padded_tokens=int(padded["input_ids"].numel()))
        measure(row, ours, real, n); rows.append(row); del m, tr; free(dev)
        pb = to_device({k_: padded[k_] for k_ in ("input_ids", "attention_mask", "labels")}, dev)
        pm = peft_model(base); pm.train()
        row = dict(shape=shape, layers=base.config.num_hidden_layers, variant="stock PEFT LoRA (padded)", attention="sdpa", N=n,
                   padded_tokens=int(padded["input_ids"].numel()))
        measure(row, peft_step(pm, pb), real, n); rows.append(row); del pm; free(dev)
        liger_todo.append((shape, base, pb, real, n))
    # liger patches the model classes' forward: measured last, after every other row
    liger = importlib.util.find_spec("liger_kernel") is not None
    for shape, base, pb, real, n in liger_todo:
        row = dict(shape=shape, layers=base.config.num_hidden_layers, variant="stock PEFT LoRA + liger FLCE (padded)", N=n)
        if not liger: row.update(status="skipped", reason="liger_kernel not installed (pip install liger-kernel)")
        elif dev.type != "cuda": row.update(status="skipped", reason="liger-kernel's Triton kernels need a GPU")
        else:
            try:
                from liger_kernel import transformers as lt
                patch = dict(qwen2=lt.apply_liger_kernel_to_qwen2, llama=lt.apply_liger_kernel_to_llama)[base.config.model_type]
                pm = peft_model(base)
                patch(rope=False, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=True,
                      model=pm.get_base_model())
                pm.train(); measure(row, peft_step(pm, pb), real, n); del pm
            except Exception as e: row.update(status="failed", error=f"{type(e).__name__}: {e}")
        rows.append(row)
    liger_todo.clear()
    if any(r["status"] == "failed" for r in rows): raise SectionFailed("a throughput row failed", rows)
    return rows


SECTIONS = [("Environment", env_section), ("Training steps of every method", steps_section),
            ("segment_sdpa vs stock sdpa", sdpa_section), ("Varlen packed attention vs the loop", varlen_section),
            ("One evaluation batch", eval_section), ("Tokens/s and MFU vs stock PEFT", throughput_section)]


# ------------------------------------------------------------------------------------------------------------ report
NOTES = {
    "Training steps of every method": "Base at the training dtype (bf16; fp32 on a CPU without bf16 units), fp32 adapters, `AlignTrainer.compute_loss` (LM + λ·align) on one "
        "packed micro-batch of random tokens, AdamW at the paper's learning rate; `decreased` is informational (the "
        "check is: finite losses, fp32 adapters).",
    "segment_sdpa vs stock sdpa": "Packed batch through `segment_sdpa` vs every sequence alone through stock sdpa "
        "(no mask, no padding); lora adapters with random A and B, dropout off; CE summed over the supervised tokens. "
        "Tolerance: ‖Δ‖/‖ref‖ ≤ 1e-4 in fp32, ≤ 3e-2 in bf16 (different kernels round differently).",
    "Varlen packed attention vs the loop": "One packed stream of the shape's heads (random q, k, v); loss = Σ out². "
        "Same tolerances as above.",
    "Tokens/s and MFU vs stock PEFT": "Forward + backward of one micro-batch (no optimizer step), median; tokens = real "
        "(non-padding) tokens; MFU = 6·N·tokens / time / measured `torch.mm` peak at the training dtype, N = non-embedding weights "
        "(the LM head excluded). Stock PEFT: `get_peft_model` with the same rank, α, dropout and targets, on the padded batch "
        "with full logits, under bf16 autocast (none in fp32).",
}
def md_table(rows: list[dict]) -> str:
    if not rows: return "_(no rows)_\n"
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
                      *("| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows)]) + "\n"


def report_md(res: dict) -> str:
    out = [f"# GPU check ({res['device']}, {res['dtype']}{', quick' if res['quick'] else ''})", "",
           f"{'all sections passed or skipped' if res['ok'] else 'FAILED: ' + ', '.join(res['failed'])}; "
           f"{res['seconds']:.0f} s in all. Shapes: {', '.join(res['shapes'])}.", ""]
    for i, s in enumerate(res["sections"], 1):
        out += [f"## {i}. {s['name']} — {s['status']} ({s['seconds']:.1f} s)", ""]
        if s.get("reason"): out += [f"{s['status'].capitalize()}: {s['reason']}", ""]
        if NOTES.get(s["name"]): out += [NOTES[s["name"]], ""]
        if s.get("traceback"): out += ["```", s["traceback"].rstrip(), "```", ""]
        out += [md_table(s["rows"])]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="'cuda' (default), 'cuda:1', or 'cpu'")
    ap.add_argument("--out", default="gpu_check_report.md", help="Markdown report (its JSON twin: same name, .json)")
    ap.add_argument("--quick", action="store_true", help="tiny layer counts, short rows, few steps")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list from {{{','.join(SHAPES)}}}")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: 2 quick, 5 full)")
    ap.add_argument("--dtype", default="auto", help="training dtype: 'auto' (bf16 where the device has bf16 units, else "
                    "fp32: `alignlora.models.resolve_dtype`), 'bfloat16' or 'float32'")
    a = ap.parse_args(argv)
    a.shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    bad = [s for s in a.shapes if s not in SHAPES]
    if bad or not a.shapes: ap.error(f"--shapes: unknown {bad or a.shapes}; choose from {', '.join(SHAPES)}")
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device; use --device cpu for a CPU run")
    a.steps = a.steps or (2 if a.quick else 5)
    from alignlora.models import resolve_dtype
    name = resolve_dtype(a.dtype, a.device)
    if name not in ("bfloat16", "float32"): ap.error(f"--dtype {a.dtype}: use 'auto', 'bfloat16' or 'float32'")
    a.dtype = getattr(torch, name)   # bf16 on a CPU without bf16 matrix units runs, but many times slower than fp32
    out = Path(a.out)
    from alignlora.files import atomic_write, atomic_json
    ctx, sections, t_all = {}, [], time.perf_counter()
    for name, fn in SECTIONS:
        t0 = time.perf_counter(); s = dict(name=name, rows=[])
        try: s.update(rows=fn(a, ctx), status="ok")
        except Skip as e: s.update(status="skipped", reason=str(e))
        except Exception as e:
            s.update(status="failed", reason=f"{type(e).__name__}: {e}", rows=getattr(e, "rows", []))
            if not isinstance(e, SectionFailed): s["traceback"] = traceback.format_exc(limit=6)
        s["seconds"] = round(time.perf_counter() - t0, 2); sections.append(s)
        print(f"[{s['status']:>7s}] {name} ({s['seconds']:.1f} s){': ' + s['reason'] if s.get('reason') else ''}", flush=True)
    failed = [s["name"] for s in sections if s["status"] == "failed"]
    res = dict(device=str(a.device), dtype=str(a.dtype).removeprefix("torch."), quick=a.quick, shapes=a.shapes, steps=a.steps, ok=not failed, failed=failed,
               seconds=round(time.perf_counter() - t_all, 1), sections=sections)
    atomic_write(out, report_md(res)); atomic_json(out.with_suffix(".json"), res)
    print(f"report: {out} (and {out.with_suffix('.json')})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
