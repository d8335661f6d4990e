"""alignlora.adapters / alignlora.methods against independent references: stock PEFT LoRA, float64 hand loops,
the paper's %Param rows, and round trips through disk."""
import json, os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from alignlora.adapters import (AdapterConfig, AdapterLinear, add_adapters, adapter_layers, capture_features,
                                merge_adapters, unmerge_adapters, trainable_fraction, save_adapters, load_adapters,
                                export_peft, import_peft, adapter_state_dict)
from alignlora.methods import METHODS, get_method
from alignlora.models import load_model, meta_model, model_config

MERGEABLE = [n for n, m in METHODS.items() if m.mergeable]
ROUTED = [n for n, m in METHODS.items() if not m.mergeable]


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny")[1]


@pytest.fixture(scope="module")
def batch(tok):
    return tok(["Align, don't divide.", "Multi-task LoRA: heads, routers and one shared A."],
               return_tensors="pt", padding=True)


def tiny():
    return load_model("tiny")[0]


def logits(model, batch):
    with torch.no_grad(): return model(**batch).logits


def train_a_little(model, batch, steps=3, lr=1e-2, seed=0):
    "A few optimiser steps on the LM loss so B, A and routers move away from their init."
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


# ---------------------------------------------------------------- stock PEFT equivalence
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_equals_peft_lora(batch, rslora):
    from peft import LoraConfig, get_peft_model
    ours = add_adapters(tiny(), get_method("lora", rslora=rslora))
    theirs = get_peft_model(tiny(), LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, use_rslora=rslora,
                                               target_modules=["gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(0)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if hasattr(m, "lora_A") and isinstance(getattr(m, "lora_A"), nn.ModuleDict)}
    assert len(peft_layers) == len(adapter_layers(ours)) == 6
    with torch.no_grad():
        for l in adapter_layers(ours):
            l.lora_A.normal_(0, 0.1); l.lora_B.normal_(0, 0.1)
            p = peft_layers[l.path]
            p.lora_A["default"].weight.copy_(l.lora_A); p.lora_B["default"].weight.copy_(l.lora_B)
    ours.eval(); theirs.eval()
    a, b = logits(ours, batch), logits(theirs, batch)
    assert (a - b).abs().max().item() <= 1e-6
    assert (a - logits(tiny(), batch)).abs().max() > 1e-3     # the adapters do change the output
    # training mode: same dropout RNG consumption order, so the same masks
    ours.train(); theirs.train()
    torch.manual_seed(5); a = ours(**batch).logits
    torch.manual_seed(5); b = theirs(**batch).logits
    assert (a - b).abs().max().item() <= 1e-6


# ---------------------------------------------------------------- every method starts at the base model
@pytest.mark.parametrize("name", list(METHODS))
def test_fresh_adapters_leave_outputs_unchanged(batch, name):
    ref = logits(tiny(), batch)
    m = add_adapters(tiny(), name)
    assert not m.training                   # load_model gives eval; wrapped layers follow
    out = logits(m, batch)
    assert (out - ref).abs().max().item() < 1e-5, name
    if METHODS[name].adapter.init == "random":  # R-LoRA / M-LoRA: nonzero B, start at W only through the W' offset
        l = adapter_layers(m)[0]
        assert l.lora_B.abs().sum() > 0
        assert l.offset_A is not None
        l.offset_A = l.offset_B = None
        assert (logits(m, batch) - ref).abs().max().item() > 1e-4


def test_random_init_matches_paper_scale():
    "A ~ N(0,1/d_in), B_i ~ N(0,1/d_out), both times d_out^(1/4)/sqrt(gamma), every head at the same scale."
    torch.manual_seed(0)
    d_in, d_out, r, N = 512, 2048, 16, 4
    l = AdapterLinear(nn.Linear(d_in, d_out), AdapterConfig(r=r, heads=N, init="random", gamma=64))
    s = d_out ** 0.25 / 8
    assert abs(l.lora_A.std().item() / (s / d_in ** 0.5) - 1) < 0.03
    per_head = l.lora_B.unflatten(1, (N, r)).std(dim=(0, 2)) / (s / d_out ** 0.5)
    assert ((per_head - 1).abs() < 0.03).all()
    # offset = -s * mean_i B_i A (float64 reference)
    Bs = l.lora_B.double().unflatten(1, (N, r))
    ref = -l.cfg.scaling * sum(Bs[:, i] @ l.lora_A.double() for i in range(N)) / N
    assert torch.allclose((l.offset_B.double() @ l.offset_A.double()), ref, atol=1e-6)


# ---------------------------------------------------------------- batched forward == hand loop (float64)
@pytest.mark.parametrize("cfg", [
    AdapterConfig(r=4, heads=3, router=True, dropout=0),
    AdapterConfig(r=4, heads=3, init="random", dropout=0, aggregation="mean", rslora=True),
    AdapterConfig(r=3, heads=2, dropout=0, aggregation="sum"),
    AdapterConfig(r=2, experts=3, router=True, dropout=0),
    AdapterConfig(r=2, experts=3, dropout=0, init="random"),
])
def test_batched_heads_equal_hand_loop(cfg):
    torch.manual_seed(0)
    l = AdapterLinear(nn.Linear(12, 20), cfg).double().eval()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    with torch.no_grad():
        l.lora_B.normal_(); l.lora_A.normal_()
        if l.router is not None: l.router.weight.normal_()
        ref = l.base(x)
        w = (torch.softmax(x @ l.router.weight.T, -1) if cfg.router
             else torch.full((3, 7, cfg.branches), 1 / cfg.branches if cfg.aggregation == "mean" else 1.0, dtype=x.dtype))
        for i in range(cfg.branches):
            A = l.lora_A[:cfg.r] if cfg.heads > 1 else l.lora_A[i * cfg.r:(i + 1) * cfg.r]
            ref = ref + cfg.scaling * w[..., i:i + 1] * (x @ A.T @ l.lora_B[:, i * cfg.r:(i + 1) * cfg.r].T)
        if l.offset_A is not None: ref = ref + x @ l.offset_A.T @ l.offset_B.T
        assert torch.allclose(l(x), ref, atol=1e-10)


# ---------------------------------------------------------------- merging
@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_equals_unmerged_after_training(batch, name):
    m = train_a_little(add_adapters(tiny(), name), batch)
    base = logits(tiny(), batch)
    a = logits(m, batch)
    assert (a - base).abs().max() > 1e-4, "training should have moved the adapter"
    merge_adapters(m)
    assert all(l.merged for l in adapter_layers(m))
    b = logits(m, batch)
    unmerge_adapters(m)
    c = logits(m, batch)
    assert (a - b).abs().max().item() < 1e-4
    assert (a - c).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ROUTED)
def test_routed_methods_refuse_to_merge(name):
    m = add_adapters(tiny(), name)
    w0 = adapter_layers(m)[0].base.weight.clone()
    with pytest.raises(ValueError, match="cannot merge"): merge_adapters(m)
    assert torch.equal(adapter_layers(m)[0].base.weight, w0)
    with pytest.raises(ValueError, match="cannot merge"): export_peft(m, "/nonexistent/never-written")


# ---------------------------------------------------------------- PEFT export / import
@pytest.mark.parametrize("name", MERGEABLE)
def test_export_peft_loads_in_peft_and_imports_back(batch, name, tmp_path):
    from peft import PeftModel
    m = train_a_little(add_adapters(tiny(), name), batch)
    ours = logits(m, batch)
    export_peft(m, tmp_path / "peft")
    files = sorted(p.name for p in (tmp_path / "peft").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    c = METHODS[name].adapter
    # smallest exact rank: heads fold into r; a trained W' offset adds r more; experts give E*r
    expected_rank = c.experts * c.r * (2 if c.init == "random" else 1)
    assert cfg["r"] == expected_rank
    pm = PeftModel.from_pretrained(tiny(), tmp_path / "peft").eval()
    theirs = logits(pm, batch)
    assert (ours - theirs).abs().max().item() < 1e-4
    back = import_peft(tiny(), tmp_path / "peft")
    assert (logits(back, batch) - ours).abs().max().item() < 1e-4
    # and PEFT's own merge of our export gives the same model
    merged = pm.merge_and_unload()
    assert (logits(merged, batch) - ours).abs().max().item() < 1e-4


def test_export_plain_lora_keeps_rank_alpha_and_weights(batch, tmp_path):
    m = train_a_little(add_adapters(tiny(), "lora"), batch)
    export_peft(m, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (8, 32, False)
    back = import_peft(tiny(), tmp_path / "p")
    for a, b in zip(adapter_layers(m), adapter_layers(back)):
        assert torch.equal(a.lora_A, b.lora_A)
        assert torch.equal(a.lora_B, b.lora_B)
    assert torch.equal(logits(back, batch), logits(m, batch))


def test_m_lora_at_init_exports_rank_r(tmp_path):
    export_peft(add_adapters(tiny(), "m-lora"), tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 4


def test_import_stock_peft_adapter(batch, tmp_path):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    pm = get_peft_model(tiny(), LoraConfig(r=6, lora_alpha=12, target_modules=["up_proj", "down_proj"],
                                           init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "stock")
    ours = import_peft(tiny(), tmp_path / "stock")
    assert len(adapter_layers(ours)) == 4
    assert adapter_layers(ours)[0].cfg.r == 6
    assert (logits(ours, batch) - logits(pm, batch)).abs().max().item() <= 1e-6


# ---------------------------------------------------------------- own save / load
@pytest.mark.parametrize("name", list(METHODS))
def test_save_load_round_trip(batch, name, tmp_path):
    m = train_a_little(add_adapters(tiny(), name), batch, steps=2)
    d = save_adapters(m, tmp_path / "ad")
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary folders left behind"
    back = load_adapters(tiny(), d)           # adds the adapters itself
    assert back is not None
    assert not back.training
    for (k, a), (k2, b) in zip(adapter_state_dict(m).items(), adapter_state_dict(back).items()):
        assert k == k2
        assert torch.equal(a, b)
    assert torch.equal(logits(back, batch), logits(m, batch))
    # a second save replaces the folder atomically
    save_adapters(back, d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_load_into_mismatched_adapters_fails(tmp_path):
    save_adapters(add_adapters(tiny(), "lora"), tmp_path / "a")
    with pytest.raises(ValueError, match="differ"): load_adapters(add_adapters(tiny(), "m-lora"), tmp_path / "a")
    with pytest.raises(FileNotFoundError): load_adapters(tiny(), tmp_path / "missing")


# ---------------------------------------------------------------- budgets (paper notes §1)
PAPER_PARAM = {  # (method, model) -> %Param of the paper's rows, as paper notes §1 computes them
    ("lora-r10", "qwen2.5-3b"): 0.455, ("hydralora", "qwen2.5-3b"): 0.458, ("r-lora", "qwen2.5-3b"): 0.458,
    ("hydralora-norouter", "qwen2.5-3b"): 0.406, ("m-lora", "qwen2.5-3b"): 0.406,
    ("lora-r4", "qwen2.5-7b"): 0.099, ("lora", "qwen2.5-7b"): 0.198, ("lora-r9", "qwen2.5-7b"): 0.223,
    ("lora-r10", "qwen2.5-7b"): 0.248, ("hydralora", "qwen2.5-7b"): 0.250, ("r-lora", "qwen2.5-7b"): 0.250,
    ("hydralora-norouter", "qwen2.5-7b"): 0.221, ("m-lora", "qwen2.5-7b"): 0.221,
}


@pytest.mark.parametrize("method,model", list(PAPER_PARAM))
def test_trainable_fraction_matches_paper(method, model):
    m = add_adapters(meta_model(model), method)
    pct = 100 * trainable_fraction(m)
    assert abs(pct - PAPER_PARAM[method, model]) < 0.01, (method, model, pct)
    # and the count equals the hand formula of paper notes §1 (per module: r d_in + N r d_out [+ N d_in])
    c, cfg = model_config(model), METHODS[method].adapter
    h, i, L, r, N = c.hidden_size, c.intermediate_size, c.num_hidden_layers, cfg.r, cfg.heads
    per = lambda din, dout: r * din + N * r * dout + (N * din if cfg.router else 0)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == L * (2 * per(h, i) + per(i, h))


def test_trainable_fraction_paper_printed_rounding():
    "The paper prints LoRA r10 / multi-head on Qwen2.5-7B as 0.25 / 0.25 (router) / 0.22 (no router)."
    for meth, printed in [("lora-r10", 0.25), ("r-lora", 0.25), ("m-lora", 0.22)]:
        assert round(100 * trainable_fraction(add_adapters(meta_model("qwen2.5-7b"), meth)), 2) == printed


# ---------------------------------------------------------------- routers, dropout, gradients
def test_router_weights_sum_to_one_and_are_fp32(batch):
    m = add_adapters(tiny(), "hydralora")
    xs = []
    h = adapter_layers(m)[0].register_forward_pre_hook(lambda mod, args: xs.append(args[0]))
    m(**batch); h.remove()
    l = adapter_layers(m)[0]
    w = l.routing_weights(xs[0])
    assert w.shape == (*batch["input_ids"].shape, 3)
    assert w.dtype == torch.float32
    assert torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]), atol=1e-6)
    wb = l.routing_weights(xs[0].bfloat16())
    assert wb.dtype == torch.float32


def test_per_head_dropout_masks():
    torch.manual_seed(0)
    N, r = 3, 8
    l = AdapterLinear(nn.Linear(16, N * r), AdapterConfig(r=r, alpha=r, heads=N, head_dropout=0.5, dropout=0,
                                                         aggregation="sum"))
    with torch.no_grad(): l.lora_B.copy_(torch.eye(N * r))   # output - Wx = [drop_1(Ax), ..., drop_N(Ax)]
    x = torch.randn(4, 6, 16)
    z = (x @ l.lora_A.T).detach()
    l.train()
    heads = (l(x) - l.base(x)).detach().unflatten(-1, (N, r))
    kept = heads != 0
    for i in range(N):
        for j in range(i + 1, N): assert not torch.equal(kept[..., i, :], kept[..., j, :])
    assert 0.4 < kept.float().mean() < 0.6
    assert torch.allclose(heads[kept], (z.unsqueeze(-2).expand_as(heads) * 2)[kept], atol=1e-6)
    l.eval()
    assert torch.allclose(l(x) - l.base(x), z.repeat(1, 1, N), atol=1e-6)


@pytest.mark.parametrize("name", ["lora", "hydralora", "r-lora", "m-lora", "loramoe"])
def test_only_adapter_parameters_get_gradients(batch, name):
    m = add_adapters(tiny(), name).train()
    m(**batch, labels=batch["input_ids"]).loss.backward()
    for n, p in m.named_parameters():
        is_adapter = any(k in n for k in (".lora_A", ".lora_B", ".router."))
        assert p.requires_grad == is_adapter, n
        assert (p.grad is not None) == is_adapter, n
    assert all(not b.requires_grad for n, b in m.named_buffers() if "offset_" in n)
    # something actually trains: B gets a nonzero gradient even from a zero init
    assert adapter_layers(m)[0].lora_B.grad.abs().sum() > 0


# ---------------------------------------------------------------- features for the alignment loss
def test_capture_features(batch):
    m = add_adapters(tiny(), "r-lora").train()
    n_layers = len(adapter_layers(m))
    order = []
    hooks = [l.register_forward_hook(lambda mod, a, o: order.append(mod.path)) for l in adapter_layers(m)]
    with capture_features(m) as feats:
        m(**batch)
        assert all(l.features is not None for l in adapter_layers(m))
    for h in hooks: h.remove()
    assert len(feats) == n_layers
    assert [f.shape for f in feats] == [(*batch["input_ids"].shape, 4)] * n_layers
    # forward order, and the tensors are A·x (before per-head dropout): recompute from the layer inputs
    assert order == [l.path for l in adapter_layers(m)]
    assert all(f.requires_grad and f.grad_fn is not None for f in feats)
    assert all(l._capture is None and l.features is None for l in adapter_layers(m))
    m(**batch); assert len(feats) == n_layers             # off outside the block
    sum(f.pow(2).sum() for f in feats).backward()
    assert all(l.lora_A.grad is not None and l.lora_A.grad.abs().sum() > 0 for l in adapter_layers(m))
    assert not any(l._forward_hooks or l._forward_pre_hooks for l in adapter_layers(m))


def test_capture_features_is_pre_head_dropout():
    torch.manual_seed(0)
    l = AdapterLinear(nn.Linear(16, 8), AdapterConfig(r=4, heads=3, head_dropout=0.5, dropout=0)).train()
    x = torch.randn(2, 3, 16)
    with capture_features(nn.Sequential(l)) as feats: l(x)
    assert torch.allclose(feats[0], x @ l.lora_A.T)


def test_capture_features_with_gradient_checkpointing(batch):
    m = add_adapters(tiny(), "align-lora-kl").train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n = len(adapter_layers(m))
    with capture_features(m) as feats:
        out = m(**batch, labels=batch["input_ids"])
        (out.loss + sum(f.pow(2).mean() for f in feats)).backward()   # recomputation runs inside the block
        assert len(feats) == n
    assert adapter_layers(m)[0].lora_A.grad is not None


def test_capture_features_needs_shared_A():
    with pytest.raises(ValueError, match="shared A"):
        with capture_features(add_adapters(tiny(), "loramoe")): pass


# ---------------------------------------------------------------- errors and the registry
def test_add_adapters_errors():
    with pytest.raises(ValueError, match="gate_proj"): add_adapters(tiny(), "lora", target_modules=("qkv_proj",))
    m = add_adapters(tiny(), "lora")
    with pytest.raises(ValueError, match="already has adapters"): add_adapters(m, "lora")
    m2 = add_adapters(tiny(), AdapterConfig(r=2), target_modules=("mlp.down_proj",))
    assert [l.path.rsplit(".", 1)[-1] for l in adapter_layers(m2)] == ["down_proj", "down_proj"]
    m3 = add_adapters(tiny(), get_method("lora"), target_modules=r"model\.layers\.0\..*_proj")
    assert len(adapter_layers(m3)) == 7                    # regex string: q, k, v, o, gate, up, down of layer 0


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-1), dict(heads=0), dict(experts=0), dict(init="xavier"),
                                 dict(aggregation="max"), dict(heads=2, experts=2), dict(router=True)])
def test_config_validation(bad):
    with pytest.raises(ValueError): AdapterConfig(**bad)


def test_registry():
    assert set(METHODS) >= {"lora", "lora-r4", "lora-r9", "lora-r10", "hydralora", "hydralora-norouter", "r-lora",
                            "m-lora", "loramoe", "align-lora-kl", "align-lora-mmd"}
    with pytest.raises(KeyError, match="hydralora"): get_method("hydra")
    with pytest.raises(TypeError, match="rank"): get_method("lora", rank=4)
    m = get_method("m-lora", heads=4, align="kl")
    assert (m.adapter.heads, m.align, m.align_lambda) == (4, "kl", 0.2)
    assert METHODS["m-lora"].adapter.heads == 3
    assert (METHODS["align-lora-mmd"].align, METHODS["align-lora-mmd"].align_lambda) == ("mmd", 0.01)
    r = METHODS["r-lora"].adapter
    assert (r.r, r.heads, r.router, r.init, r.rslora, r.gamma, r.head_dropout > 0) == (4, 3, True, "random", True, 64, True)
    h = METHODS["hydralora"].adapter
    assert (h.r, h.heads, h.router, h.init, h.dropout) == (4, 3, True, "lora", 0.05)
    assert METHODS["m-lora"].adapter.aggregation == "mean"
    assert not METHODS["m-lora"].adapter.router
