"""Alignment over the optimizer step is exact under gradient accumulation (float64, tiny model).

(k = 2, GA = 4) must give the adapter gradients of (k = 8, GA = 1) on the same rows, with and without gradient
checkpointing; with dropout on, those of an independent reference that keeps every micro-batch's graph alive and
backpropagates the whole step's loss once, under the same dropout masks.

The MMD's gradient with the paper's bandwidths (σ down to 1e-6) is ill-conditioned: float64 rounding of the upstream
gradient is amplified roughly in proportion to 1/σ_min (measured on this model with adapter weights of scale 1: two
equal gradients computed in two orders differ by 0.16; by 6e-7 with σ ≥ 1). Adapter weights of scale 0.03 keep it at
float64 rounding, so the test checks the decomposition, not the conditioning of the loss."""
import os, tempfile

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from alignlora.adapters import add_adapters, capture_features
from alignlora.align import align_groups, align_loss
from alignlora.data import encode_many, load_task
from alignlora.methods import get_method
from alignlora.models import load_model
from alignlora.train import IGNORE, AlignTrainer, alignment_mask, pack_collate, segment_attention, unpack

TASKS = ["qnli", "piqa", "winogrande"]
K, GA, LAM = 2, 4, 0.7


@pytest.fixture(scope="module")
def rows():
    _, tok = load_model("tiny")
    per_task = [[dict(f, task_id=i) for f in encode_many(load_task(t, "train", n=K * GA, seed=0), tok, max_length=64)]
                for i, t in enumerate(TASKS)]
    assert all(len(p) == K * GA for p in per_task)
    # micro-batch j holds rows 2j, 2j+1 of every task, in task order (as the balanced sampler builds them)
    micro = [[f for p in per_task for f in p[K * j:K * (j + 1)]] for j in range(GA)]
    return tok, micro


def _model(kind, dropout, checkpointing, scale=0.03):
    torch.manual_seed(0)
    m, _ = load_model("tiny"); m = m.double()
    add_adapters(m, get_method(f"align-lora-{kind}", dropout=dropout).adapter)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # B = 0 at init: give every adapter weight a value, so every gradient path is live
        for p in m.parameters():
            if p.requires_grad: p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    if checkpointing: m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    return m


def _grads(m):
    return torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])


def _trainer_step(m, tok, batches, k, ga, kind, lam, groups="task", rng_seed=None):
    "One optimizer step's gradients through AlignTrainer's own step machinery (pre-pass + grad passes)."
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=k * len(TASKS),
                             gradient_accumulation_steps=ga, report_to=[], use_cpu=True, seed=0)
    tr = AlignTrainer(model=m, args=args, task_sizes=[K * GA] * len(TASKS), align=kind if lam else None,
                      align_lambda=lam, processing_class=tok, align_groups=groups)
    if rng_seed is not None: torch.manual_seed(rng_seed)   # after the Trainer's own set_seed(args.seed)
    m.zero_grad()
    with segment_attention(m):   # as AlignTrainer.train: checkpoint recomputation attends per sequence too
        got, n_items = tr.get_batch_samples(iter(batches), ga, torch.device("cpu"))
        assert len(got) == ga
        for b in got: tr.training_step(m, b, n_items)
    return _grads(m)


def _reference_step(m, batches, kind, lam):
    "Independent reference: every micro-batch's graph kept alive, the whole step's loss backpropagated once."
    m.zero_grad()
    n_items = sum(int((b["shift_labels"] != IGNORE).sum()) for b in batches)
    lm, feats, padded = 0.0, [], []
    for b in batches:
        with capture_features(m) as f, segment_attention(m):
            out = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                    cu_seq_lens_q=b["cu_seq_lens"], use_cache=False)
        lm = lm + F.cross_entropy(out.logits.flatten(0, 1), b["shift_labels"].flatten(), ignore_index=IGNORE,
                                  reduction="sum") / n_items
        ui, um = b["unpack_index"], b["unpack_mask"]
        feats.append([unpack(x, ui) for x in f])
        padded.append((unpack(b["input_ids"], ui), um, unpack(b["labels"], ui).masked_fill(~um, IGNORE), b["task_ids"]))
    S = max(p[0].shape[1] for p in padded)
    pad = lambda x, v: F.pad(x, (0, S - x.shape[1]) if x.dim() == 2 else (0, 0, 0, S - x.shape[1]), value=v)
    ids = torch.cat([pad(p[0], 0) for p in padded]); real = torch.cat([pad(p[1], False) for p in padded])
    labels = torch.cat([pad(p[2], IGNORE) for p in padded]); tids = torch.cat([p[3] for p in padded])
    X = [torch.cat([pad(f[l], 0.0) for f in feats]) for l in range(len(feats[0]))]
    L = align_loss(X, tids, kind, mask=alignment_mask(ids, real, labels, tids, "content"), num_tasks=len(TASKS))
    with segment_attention(m): (lm + lam * L).backward()
    return _grads(m)


def _rel(a, b): return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["kl", "mmd"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_accumulated_step_equals_one_large_batch(rows, kind, checkpointing):
    tok, micro = rows
    small = [pack_collate(mb, tok.pad_token_id) for mb in micro]
    large = [pack_collate([f for mb in micro for f in mb], tok.pad_token_id)]
    m = _model(kind, 0.0, checkpointing)
    g_small = _trainer_step(m, tok, small, K, GA, kind, LAM)
    g_large = _trainer_step(m, tok, large, K * GA, 1, kind, LAM)
    g_lm = _trainer_step(m, tok, small, K, GA, kind, 0.0)
    g_ref = _reference_step(m, small, kind, LAM)
    align_small, align_large = g_small - g_lm, g_large - g_lm
    assert align_large.norm() > 1e-3 * g_lm.norm(), "the alignment term must move the gradient"
    assert _rel(g_small, g_large) < 1e-9
    assert _rel(align_small, align_large) < 1e-9
    assert _rel(g_small, g_ref) < 1e-9


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_accumulated_step_with_dropout_equals_keep_every_graph(rows, kind):
    tok, micro = rows
    small = [pack_collate(mb, tok.pad_token_id) for mb in micro]
    m = _model(kind, 0.1, False)
    g = _trainer_step(m, tok, small, K, GA, kind, LAM, rng_seed=123)
    after = torch.get_rng_state()
    torch.manual_seed(123); g_ref = _reference_step(m, small, kind, LAM)
    assert torch.equal(after, torch.get_rng_state()), "the pre-pass must leave the generator where training leaves it"
    torch.manual_seed(124); g_other = _reference_step(m, small, kind, LAM)
    assert _rel(g_other, g_ref) > 1e-3, "dropout must matter, or the test shows nothing"
    assert _rel(g, g_ref) < 1e-9


def test_per_micro_batch_statistics_differ(rows):
    # the statistics of a step are not those of its micro-batches: the mean of per-micro-batch KLs is another number
    tok, micro = rows
    small = [pack_collate(mb, tok.pad_token_id) for mb in micro]
    m = _model("kl", 0.0, False)
    g_step = _trainer_step(m, tok, small, K, GA, "kl", LAM)
    g_each = sum(_trainer_step(m, tok, [b], K, 1, "kl", LAM / GA) for b in small)   # λ/G per micro-batch
    assert _rel(g_each, g_step) > 1e-3


def test_positional_groups_are_exact_and_differ_from_task_groups(rows):
    tok, micro = rows
    small = [pack_collate(mb, tok.pad_token_id) for mb in micro]
    large = [pack_collate([f for mb in micro for f in mb], tok.pad_token_id)]
    m = _model("mmd", 0.0, False)
    g_small = _trainer_step(m, tok, small, K, GA, "mmd", LAM, groups="positional")
    g_large = _trainer_step(m, tok, large, K * GA, 1, "mmd", LAM, groups="positional")
    g_task = _trainer_step(m, tok, small, K, GA, "mmd", LAM)
    assert _rel(g_small, g_large) < 1e-9
    assert _rel(g_small, g_task) > 1e-4
    tids = large[0]["task_ids"]
    groups = align_groups(tids, "positional", len(TASKS), seed=0)
    mixed = [len(set(tids[groups == g].tolist())) for g in range(len(TASKS))]
    assert max(mixed) > 1, "positional groups mix tasks"


def test_step_logs_samples_per_task():
    from alignlora.train import train
    r = train("tiny", "align-lora-mmd", TASKS, n_train=8, max_length=64, k=2, max_steps=2, align_samples=8, progress=False)
    assert r.config["align_samples"] == 8
    assert r.config["training_args"]["gradient_accumulation_steps"] == 4
    assert [row["align_samples"] for row in r.log] == [8, 8]
    with pytest.raises(ValueError, match="align_samples"):
        train("tiny", "align-lora-kl", TASKS, n_train=8, k=2, align_samples=5, progress=False)
    with pytest.raises(ValueError, match="align_samples=1"):
        train("tiny", "align-lora-kl", TASKS, n_train=8, k=1, max_steps=1, progress=False)
    with pytest.warns(UserWarning, match="heavy-tailed"):
        train("tiny", "align-lora-kl", TASKS, n_train=8, max_length=64, k=2, max_steps=1, progress=False)
