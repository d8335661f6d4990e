"""The paper-scale path on CPU: bf16 adapters against stock PEFT, alignment and log-likelihood precision, checkpointing,
DataParallel's split, ranks under torchrun, freeing models, offline HF-cache loading, the paper's training arguments,
host syncs per micro-batch and the memory table."""
import copy, gc, json, os, subprocess, sys, textwrap, weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("ALIGNLORA_DATA", "/work/shared/data")
ROOT = Path(__file__).resolve().parents[1]

from alignlora.adapters import add_adapters, adapter_layers
from alignlora.models import load_model

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _peft_pair(autocast_adapter_dtype: bool):
    "The tiny bf16 model with stock PEFT LoRA and with ours, sharing A and a random B."
    from peft import LoraConfig, get_peft_model
    base, tok = load_model("tiny", dtype=torch.bfloat16)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS),
                         autocast_adapter_dtype=autocast_adapter_dtype)
    ours = add_adapters(base, "lora", autocast_adapter_dtype=autocast_adapter_dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l in adapter_layers(ours):
            pl = ref.get_submodule("base_model.model." + l.path)
            pl.lora_B["default"].weight.copy_(torch.randn(pl.lora_B["default"].weight.shape, generator=g) * 0.05)
            l.lora_A.copy_(pl.lora_A["default"].weight); l.lora_B.copy_(pl.lora_B["default"].weight)
    return ref, ours, tok


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bf16_adapters_match_peft(autocast_adapter_dtype):
    ref, ours, tok = _peft_pair(autocast_adapter_dtype)
    want = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    peft_dtypes = {p.dtype for n, p in ref.named_parameters() if p.requires_grad}
    our_dtypes = {p.dtype for p in ours.parameters() if p.requires_grad}
    assert peft_dtypes == our_dtypes == {want}
    ids = tok(["Answer: solution1 and some more words", "Question: what is 2 + 2?"], return_tensors="pt", padding=True)
    lo_ref = ref(**ids).logits; lo = ours(**ids).logits
    assert lo.dtype == lo_ref.dtype == torch.bfloat16       # the low-rank path returns the base output's dtype
    # one layer: with fp32 adapters PEFT rounds y + s·BAx once (fp32 sum, then bf16), and so do we: equal up to one
    # bf16 ulp; with bf16 adapters both round every product (PEFT: BAx, ·s and + separately; we: one addmm)
    l = adapter_layers(ours)[0]; pl = ref.get_submodule("base_model.model." + l.path)
    x = torch.randn(3, 7, l.base.in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
    y, y_ref = l(x), pl(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    ulp = y_ref.float().abs().clamp(min=1e-3) * 2 ** -7
    if autocast_adapter_dtype: assert ((y.float() - y_ref.float()).abs() <= ulp).all() and (y == y_ref).float().mean() > 0.95
    else: assert ((y.float() - y_ref.float()).abs() <= 4 * ulp.max()).all()
    assert (lo.float() - lo_ref.float()).abs().max() < 0.05 * lo_ref.float().abs().max()
    # gradients reach the adapters in their own dtype, as in PEFT
    ours(**ids).logits.float().sum().backward(); ref(**ids).logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == want for p in ours.parameters() if p.requires_grad)
    for l in adapter_layers(ours):
        pl = ref.get_submodule("base_model.model." + l.path)
        g, gr = l.lora_B.grad.float(), pl.lora_B["default"].weight.grad.float()
        assert torch.allclose(g, gr, rtol=0.1, atol=0.05 * gr.abs().max().item())


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_align_loss_under_bf16_autocast_is_fp32(kind):
    from alignlora.align import align_loss
    g = torch.Generator().manual_seed(0)
    feats = [(torch.randn(10, 16, 8, generator=g) * 0.01).requires_grad_() for _ in range(3)]
    tids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    mask = torch.rand(10, 16, generator=g) > 0.2
    f64 = [f.detach().double().requires_grad_() for f in feats]
    ref = align_loss(f64, tids, kind, mask=mask); ref.backward()                  # fp64 reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = align_loss(feats, tids, kind, mask=mask)
        val.backward()                                                            # backward inside autocast, too
    assert val.dtype == torch.float32
    assert abs(val.item() - ref.item()) <= 1e-4 * abs(ref.item()), (val.item(), ref.item())
    for f, r in zip(feats, f64):
        assert torch.allclose(f.grad.double(), r.grad, rtol=1e-3, atol=1e-4 * r.grad.abs().max().item())
