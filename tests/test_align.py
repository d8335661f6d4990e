"alignlora.align against an independent float64 transcription of paper notes §2 (nbs/paper_notes.ipynb) (explicit loops), gradcheck, errors."
import itertools, math

import numpy as np
import pytest
import torch

from alignlora.align import (ALIGN_KINDS, ALIGN_POOLS, MMD_BANDWIDTHS, AlignSpec, align_loss, check_align_args,
                             released_mmd_bytes)

SIGMAS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1, 5, 10, 15, 20, 25, 30, 35, 100, 1e3, 1e4, 1e5, 1e6]  # paper notes §2


# ---------------------------------------------------------------- naive reference (float64 numpy, loops)
def _sym_kl(a, b):
    "½(KL(N_a‖N_b) + KL(N_b‖N_a)), diagonal Gaussians fitted to sample sets a, b ([n, r]), unbiased var + 1e-8."
    ma, mb = a.mean(0), b.mean(0)
    va, vb = a.var(0, ddof=1) + 1e-8, b.var(0, ddof=1) + 1e-8
    def kl(m1, v1, m2, v2): return 0.5 * np.sum(np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
    return 0.5 * (kl(ma, va, mb, vb) + kl(mb, vb, ma, va))

def _k(u, v):
    d = 0.0
    for k in range(len(u)): d += (u[k] - v[k]) ** 2
    return sum(math.exp(-d / (2 * s)) for s in SIGMAS)

def _mmd(a, b):
    kxx = np.mean([_k(u, v) for u in a for v in a])
    kyy = np.mean([_k(u, v) for u in b for v in b])
    kxy = np.mean([_k(u, v) for u in a for v in b])
    return kxx + kyy - 2 * kxy

def reference(features, task_ids, kind, mask=None, pool="token", min_share=0.5):
    feats = [np.asarray(f.detach().double().numpy()) for f in features]
    tids = list(np.asarray(task_ids))
    B, S = feats[0].shape[:2]
    m = np.ones((B, S), bool) if mask is None else np.asarray(mask).astype(bool)
    tasks = sorted(set(tids))
    layer_vals = []
    for f in feats:
        if pool == "mean":   # one "position": per-sample mean over its masked positions; samples without any drop out
            groups = [{t: [f[b][m[b]].mean(0) for b in range(B) if tids[b] == t and m[b].any()] for t in tasks}]
        else:
            groups = [{t: [f[b, s] for b in range(B) if tids[b] == t and m[b, s]] for t in tasks} for s in range(S)]
        # KL: a position counts for a task when at least half its samples (those with any valid position), and
        # at least 2, are valid there; MMD: when one is
        n_any = {t: sum(1 for b in range(B) if tids[b] == t and m[b].any()) for t in tasks}
        need = {t: max(2, math.ceil(min_share * n_any[t])) if kind == "kl" else 1 for t in tasks}
        pair_vals = []
        for i, j in itertools.combinations(tasks, 2):
            vals = []
            for g in groups:
                a, b = np.array(g[i]), np.array(g[j])
                if len(a) < need[i] or len(b) < need[j]: continue
                vals.append(_sym_kl(a, b) if kind == "kl" else _mmd(a, b))
            if vals: pair_vals.append(np.mean(vals))
        layer_vals.append(np.mean(pair_vals) if pair_vals else 0.0)
    return float(np.mean(layer_vals))


def _inputs(seed, B=9, S=5, r=3, L=2, T=3, dtype=torch.float32, shift=0.7, masked=False):
    g = torch.Generator().manual_seed(seed)
    tids = torch.arange(B) % T
    feats = [(torch.randn(B, S, r, generator=g, dtype=torch.float64) * (1 + 0.3 * l)
              + shift * tids[:, None, None] * torch.linspace(-1, 1, r, dtype=torch.float64)).to(dtype) for l in range(L)]
    mask = None
    if masked:
        mask = torch.rand(B, S, generator=g) > 0.35
        mask[0, :] = False        # a sample with no valid position at all
        mask[:, -1] = False       # a position nobody has
        mask[1:, 0] = True
    return feats, tids, mask


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("kind", ALIGN_KINDS)
@pytest.mark.parametrize("pool", ALIGN_POOLS)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference(kind, pool, masked):
    feats, tids, mask = _inputs(1, masked=masked)
    ref = reference(feats, tids, kind, mask, pool)
    assert ref > 0
    got32 = align_loss(feats, tids, kind, mask=mask, pool=pool)
    assert got32.dtype == torch.float32
    assert got32.dim() == 0
    assert abs(got32.item() - ref) <= 1e-5 * abs(ref), (got32.item(), ref)
    got64 = align_loss([f.double() for f in feats], tids, kind, mask=mask, pool=pool)
    assert abs(got64.item() - ref) <= 1e-10 * abs(ref), (got64.item(), ref)


def test_kl_skips_positions_with_fewer_than_two_valid_samples():
    feats, tids, _ = _inputs(2, B=6, S=4, T=2)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[tids == 0, 1] = torch.tensor([True, False, False])   # position 1: task 0 has one valid sample
    ref = reference(feats, tids, "kl", mask)
    # same as dropping position 1 altogether
    keep = [0, 2, 3]
    ref_drop = reference([f[:, keep] for f in feats], tids, "kl")
    assert abs(ref - ref_drop) < 1e-12
    assert abs(align_loss(feats, tids, "kl", mask=mask).item() - ref) <= 1e-5 * ref


@pytest.mark.parametrize("min_share", [None, 0.0, 0.75])
def test_kl_position_floor_matches_reference(min_share):
    # 8 samples per task and ragged masks: positions hold 1..8 valid samples of a task
    g = torch.Generator().manual_seed(5)
    tids = torch.arange(3).repeat_interleave(8)
    feats = [torch.randn(24, 7, 3, generator=g, dtype=torch.float64) + 0.4 * tids[:, None, None] for _ in range(2)]
    lengths = torch.randint(1, 8, (24,), generator=g)
    mask = torch.arange(7)[None] < lengths[:, None]
    ref = reference(feats, tids, "kl", mask, min_share=0.5 if min_share is None else min_share)
    got = align_loss(feats, tids, "kl", mask=mask, kl_min_share=min_share)
    assert abs(got.item() - ref) <= 1e-10 * abs(ref), (got.item(), ref)
    if min_share is None:   # the floor changes the loss here (positions with 2 or 3 valid samples of a task)
        assert abs(ref - reference(feats, tids, "kl", mask, min_share=0.0)) > 1e-3 * abs(ref)
    assert torch.autograd.gradcheck(lambda *f: align_loss(list(f), tids, "kl", mask=mask, kl_min_share=min_share),
                                    tuple(f.clone().requires_grad_() for f in feats))


def test_masked_positions_do_not_matter_and_unsorted_task_ids():
    feats, tids, mask = _inputs(3, masked=True)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    feats_p, tids_p, mask_p = [f[perm] for f in feats], tids[perm] + 2, mask[perm]   # shuffled, ids 2..4
    junk = [torch.where(mask_p[..., None], f, torch.full_like(f, 1e3)) for f in feats_p]
    for kind in ALIGN_KINDS:
        a = align_loss(feats, tids, kind, mask=mask)
        b = align_loss(junk, tids_p, kind, mask=mask_p.int())
        assert torch.allclose(a, b, rtol=1e-6), kind


def test_single_tensor_bf16_and_identical_tasks():
    feats, tids, _ = _inputs(4, L=1)
    for kind in ALIGN_KINDS:
        assert torch.equal(align_loss(feats[0], tids, kind), align_loss(feats, tids, kind))
        bf = feats[0].bfloat16()
        out = align_loss(bf, tids, kind)
        assert out.dtype == torch.float32
        assert abs(out.item() - reference([bf.float()], tids, kind)) <= 1e-5 * abs(out.item())
        # every task holds the same samples → distance 0
        same = feats[0][:3].repeat(3, 1, 1)
        assert abs(align_loss(same, torch.arange(9) // 3, kind).item()) < 1e-5


def test_all_masked_gives_connected_zero():
    feats, tids, _ = _inputs(5)
    x = [f.clone().requires_grad_() for f in feats]
    out = align_loss(x, tids, "mmd", mask=torch.zeros(9, 5, dtype=torch.bool))
    out.backward()
    assert out.item() == 0
    assert x[0].grad is not None
    assert x[0].grad.abs().sum() == 0


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ALIGN_KINDS)
@pytest.mark.parametrize("pool", ALIGN_POOLS)
def test_gradcheck(kind, pool):
    feats, tids, mask = _inputs(6, B=6, S=3, r=2, T=2, dtype=torch.float64, masked=True)
    mask[0, 0] = True
    x = tuple(f.clone().requires_grad_() for f in feats)
    assert torch.autograd.gradcheck(lambda *xs: align_loss(list(xs), tids, kind, mask=mask, pool=pool), x)


def test_mmd_keeps_no_batch_squared_autograd_state():
    "The custom MMD function saves only the features and the 0/1 weights, never a [batch, batch, seq] tensor."
    B, S, r = 20, 64, 4
    x = torch.randn(B, S, r, requires_grad=True)
    saved = {}
    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes(); return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = align_loss(x, torch.arange(B) % 4, "mmd")
    total = sum(v for k, v in saved.items() if k != x.untyped_storage().data_ptr())
    assert total < B * B * S * 4 / 4, total     # far below one [B, B, S] fp32 buffer
    loss.backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- errors and arguments
def _raises(match, f):
    with pytest.raises(ValueError, match=match): f()

def test_errors():
    feats, tids, _ = _inputs(7)
    _raises("Unknown alignment kind", lambda: align_loss(feats, tids, "cosine"))
    _raises("Unknown pool", lambda: align_loss(feats, tids, pool="max"))
    _raises("batch lacks task 3", lambda: align_loss(feats, tids, num_tasks=4))
    _raises("outside 0..1", lambda: align_loss(feats, tids, num_tasks=2))
    _raises("at least 2 tasks", lambda: align_loss(feats, torch.zeros(9, dtype=torch.long)))
    _raises("≥ 2 samples per task", lambda: align_loss([f[:4] for f in feats], torch.tensor([0, 1, 2, 2])))
    align_loss([f[:4] for f in feats], torch.tensor([0, 1, 2, 2]), "mmd")   # MMD is fine with 1 sample
    _raises("mask must have shape", lambda: align_loss(feats, tids, mask=torch.ones(9, 4)))
    _raises("task_ids must be", lambda: align_loss(feats, tids[:5]))
    _raises("task_ids must be", lambda: align_loss(feats, tids.float()))
    _raises("no features", lambda: align_loss([], tids))
    _raises("same batch", lambda: align_loss([feats[0], feats[1][:, :4]], tids))
    _raises(r"\[batch, seq, r\]", lambda: align_loss(feats[0][0], tids))


def test_check_align_args():
    assert check_align_args("kl") == ("kl", 0.2)
    assert check_align_args("mmd", 0) == ("mmd", 0.0)
    for kind, lam in [("kl", -0.01), ("mmd", float("inf")), ("KL", 0.2), ("mmd", "a")]:
        _raises("λ|Unknown", lambda: check_align_args(kind, lam))
    assert AlignSpec("mmd", pool="mean").lam == 0.01
    _raises("Unknown pool", lambda: AlignSpec("kl", pool="max"))
    assert tuple(MMD_BANDWIDTHS) == tuple(SIGMAS)


def test_released_bytes():
    # [19, N, N, S, r] bf16, per pair (10) and layer (108) at the paper's shapes: ≈ 16.8 GB
    assert released_mmd_bytes() == 19 * 10 * 10 * 512 * 8 * 2 * 10 * 108
    assert released_mmd_bytes(num_tasks=2, num_layers=1) == 19 * 100 * 512 * 8 * 2


def test_kl_gradient_is_bitwise_reproducible_across_threads():
    """The KL's backward sums in a fixed order: its gradients equal torch's deterministic mode bit for bit. Gathering the
    pairs' moments by indexing (mu[i]) made the backward accumulate with threads in a varying order, and two runs of
    align-lora-kl with the same seed then trained to different bits on 2 threads."""
    import torch
    from alignlora.align import align_loss
    torch.manual_seed(0)
    T, per, S, r = 5, 8, 512, 8
    task_ids = torch.arange(T).repeat_interleave(per)
    feats = [torch.randn(T * per, S, r) * 3 for _ in range(2)]
    def grads(deterministic: bool):
        torch.use_deterministic_algorithms(deterministic)
        try:
            fs = [f.clone().requires_grad_() for f in feats]
            align_loss(fs, task_ids, kind="kl").backward()
            return [f.grad for f in fs]
        finally: torch.use_deterministic_algorithms(False)
    ref = grads(True)
    for _ in range(3): assert all(torch.equal(a, b) for a, b in zip(grads(False), ref))
