"""Benchmark of alignlora.align (not collected by pytest).

    .venv/bin/python tests/bench_align.py [--device cpu|cuda] [--model tiny|smollm2-135m|none]

Prints, side by side in one run:
1. Memory of the alignment loss at the paper's shapes (108 adapted layers, 5 tasks × 10 samples, seq 512, r 8),
   for kl and mmd, forward + backward over all layers at once (as in training: the loss is built over all
   layers, then backward):
   - autograd state kept between forward and backward, MEASURED with `saved_tensors_hooks` (bytes of every
     distinct storage autograd saves, the features themselves excluded) — reliable on CPU and GPU;
   - on CUDA also the MEASURED peak of allocated memory above the features (`torch.cuda.max_memory_allocated`),
     which includes transient buffers and the features' gradients;
   vs the released formulation's `[19, N, N, S, r]` bf16 intermediate per task pair and layer, COMPUTED from its
   tensor sizes (`released_mmd_bytes`, a lower bound on what the released code keeps).
2. Time of align_loss forward + backward on one layer at those shapes, and over the SmolLM2-135M trainer shapes
   (90 adapted layers, batch 10 × 256 tokens, r 8), next to a model training step (frozen base, backward through
   the activations: what a LoRA step costs, less the small LoRA matmuls).
"""
import argparse, os, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch

from alignlora.align import ALIGN_KINDS, align_loss, released_mmd_bytes

GB, MB = 1e9, 1e6


def _features(L, B, S, r, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(B, S, r, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(L)]


def saved_state_bytes(feats, tids, kind, mask):
    "Bytes of distinct storages autograd saves while building the loss (the features' own storages excluded)."
    own = {f.untyped_storage().data_ptr() for f in feats}
    seen = {}
    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own: seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = align_loss(feats, tids, kind, mask=mask)
    return loss, sum(seen.values())


def memory(args, device):
    L, T, N, S, r = args.layers, args.tasks, args.per_task, args.seq, args.rank
    B = T * N
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    released = released_mmd_bytes(L, T, N, S, r, bytes_per_el=2)
    print(f"\n== memory at {L} layers, {T} tasks × {N} samples, seq {S}, r {r}, features {args.dtype}, device {device}")
    print(f"released MMD formulation ([19,N,N,S,r] bf16 per pair and layer, computed): {released / GB:.2f} GB")
    tids = (torch.arange(B) % T).to(device)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(1)) > 0.2).to(device)
    for kind in ALIGN_KINDS:
        feats = _features(L, B, S, r, dtype, device)
        feat_bytes = sum(f.numel() * f.element_size() for f in feats)
        if device.type == "cuda":
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss, saved = saved_state_bytes(feats, tids, kind, mask)
        loss.backward()
        if device.type == "cuda": torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        line = (f"{kind}: autograd state kept (measured) {saved / MB:8.1f} MB  (features themselves {feat_bytes / MB:.1f} MB)"
                f"  → released/ours = {released / saved:,.0f}×")
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
            line += f" | peak above features (measured) {peak / MB:.1f} MB → released/ours = {released / peak:,.0f}×"
        print(line + f" | fwd+bwd {L} layers {dt:.2f} s")
        del feats, loss


def _time(f, reps, device):
    f()  # warm-up
    if device.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps): f()
    if device.type == "cuda": torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def timing(args, device):
    print(f"\n== time (device {device})")
    def loss_step(L, B, S, r, T, kind):
        feats = _features(L, B, S, r, torch.float32, device)
        tids = (torch.arange(B) % T).to(device)
        mask = torch.ones(B, S, dtype=torch.bool, device=device)
        return lambda: align_loss(feats, tids, kind, mask=mask).backward()
    B = args.tasks * args.per_task
    for kind in ALIGN_KINDS:
        t1 = _time(loss_step(1, B, args.seq, args.rank, args.tasks, kind), 3, device)
        print(f"{kind}: one layer at paper shapes (batch {B}, seq {args.seq}, r {args.rank}) fwd+bwd {t1 * 1e3:.1f} ms"
              f"  (× {args.layers} layers ≈ {t1 * args.layers:.2f} s)")
    if args.model == "none": return
    from alignlora.models import load_model
    model, _ = load_model(args.model, device=device)
    model.train()
    for p in model.parameters(): p.requires_grad_(False)
    model.enable_input_require_grads()   # backward through activations, as a LoRA step does
    n_mods = 3 * model.config.num_hidden_layers
    Bm, Sm = args.model_batch, args.model_seq
    ids = torch.randint(0, model.config.vocab_size, (Bm, Sm), generator=torch.Generator().manual_seed(0)).to(device)
    step = lambda: model(input_ids=ids, labels=ids).loss.backward()
    ts = _time(step, 2, device)
    print(f"{args.model}: frozen-base training step at batch {Bm} × {Sm} tokens: {ts * 1e3:.0f} ms")
    for kind in ALIGN_KINDS:
        ta = _time(loss_step(n_mods, Bm, Sm, args.rank, 5 if Bm % 5 == 0 else 2, kind), 2, device)
        print(f"  + align_loss {kind} over its {n_mods} adapted modules (r {args.rank}) fwd+bwd: {ta * 1e3:.0f} ms"
              f"  → ({ts * 1e3:.0f} + {ta * 1e3:.0f}) / {ts * 1e3:.0f} = {(ts + ta) / ts:.3f}×")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=108)
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--per-task", type=int, default=10)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2-135m | none")
    ap.add_argument("--model-batch", type=int, default=10)
    ap.add_argument("--model-seq", type=int, default=256)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.skip_memory: memory(args, device)
    timing(args, device)
