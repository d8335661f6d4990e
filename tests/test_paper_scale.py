"""The paper-scale path on CPU: bf16 adapters against stock PEFT, alignment and log-likelihood precision, checkpointing,
DataParallel's split, ranks under torchrun, freeing models, offline HF-cache loading, the paper's training arguments,
host syncs per micro-batch and the memory table."""
import copy, gc, json, os, subprocess, sys, textwrap, weakref
from pathlib import Path

import pytest
from _dist import torchrun_ranks
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
    ref = align_loss(f64, tids, kind, mask=mask); ref.backward()                  # fp64 reference value
    f32 = [f.detach().clone().requires_grad_() for f in feats]
    align_loss(f32, tids, kind, mask=mask).backward()                             # fp32 without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = align_loss(feats, tids, kind, mask=mask)
        val.backward()                                                            # backward inside autocast, too
    assert val.dtype == torch.float32
    assert abs(val.item() - ref.item()) <= 1e-4 * abs(ref.item()), (val.item(), ref.item())
    for f, r, r32 in zip(feats, f64, f32):
        # autocast changes nothing: the fp32 gradient exactly (bf16 math would be off by ~1e-2); and fp32 rounding
        # of the ill-conditioned MMD gradient (σ down to 1e-6) stays within 1e-3 of the fp64 one's largest entry
        assert torch.equal(f.grad, r32.grad)
        assert (f.grad.double() - r.grad).abs().max() <= 1e-3 * r.grad.abs().max()


def test_bf16_loglik_uses_fp32_softmax(monkeypatch):
    # every log-softmax lm-eval takes over a bf16 model's logits is asked for fp32; the scores equal an fp32 softmax's
    from alignlora.eval import evaluate
    model, tok = load_model("tiny", dtype=torch.bfloat16)
    seen, orig = [], F.log_softmax
    def spy(x, *a, dtype=None, **kw):
        seen.append((x.dtype, dtype)); return orig(x, *a, dtype=dtype, **kw)
    import lm_eval.models.huggingface as H
    monkeypatch.setattr(H.F, "log_softmax", spy)
    res = evaluate(model, tok, ["piqa"], protocol="loglik", limit=4, batch_size=4, progress=False)
    assert seen
    assert all(dt == torch.float32 for _, dt in seen), seen   # the packed path's logits are fp32 already (next test)
    assert res["piqa"]["n"] == 4


def test_bf16_packed_loglik_scores_from_fp32_logits():
    # a bf16 output layer rounds two close logits to one value: two one-token choices then tie exactly (and a tie goes
    # to the first choice). packed_loglik scores with an fp32 output layer over the bf16 hidden states: no ties
    from alignlora.eval import packed_loglik
    model, tok = load_model("tiny", dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    with torch.no_grad(): head.weight.mul_(40)                         # logits of tens: bf16 steps of 0.125 and more
    g = torch.Generator().manual_seed(0)
    rows, ties_bf16 = [], 0
    for _ in range(24):
        ctx = torch.randint(5, model.config.vocab_size, (10,), generator=g).tolist()
        with torch.no_grad():
            h = model.get_decoder()(input_ids=torch.tensor([ctx])).last_hidden_state[0, -1]
            z32 = F.linear(h.float(), head.weight.float())             # fp32 logits of the next token
            z16 = head(h).float()                                      # the bf16 output layer's
        order = z32.argsort(descending=True)
        gap = z32[order[:-1]] - z32[order[1:]]
        k = int(torch.where(gap > 1e-2, gap, torch.inf).argmin())       # closest pair still distinct in fp32
        a, b = int(order[k]), int(order[k + 1])
        rows.append((ctx, [[a], [b]], F.log_softmax(z32, -1)[[a, b]]))
        ties_bf16 += bool(z16[a] == z16[b])
    got = packed_loglik(model, [(c, ys) for c, ys, _ in rows])
    assert ties_bf16 >= 3, ties_bf16                                   # the bf16 layer ties these pairs often
    for (_, _, ref), r in zip(rows, got):
        assert r[0][0] != r[1][0]                                      # no tie from fp32 logits
        assert torch.allclose(torch.tensor([r[0][0], r[1][0]], dtype=torch.float64), ref.double(), atol=1e-4, rtol=0)   # bf16 logits: off by 1e-3 and more


def _align_grads(reentrant: bool, lam: float):
    "Adapter gradient of LM + λ·KL on the tiny model under gradient checkpointing."
    from alignlora.adapters import capture_features
    from alignlora.align import align_loss
    model, tok = load_model("tiny"); torch.manual_seed(0); add_adapters(model, "lora")
    with torch.no_grad():
        for l in adapter_layers(model): l.lora_B.normal_(0, 0.1)
    model.train(); model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant: model.enable_input_require_grads()
    ids = tok([f"Question {i}: is {i} even? Answer: {'yes' if i % 2 == 0 else 'no'}" for i in range(6)],
              return_tensors="pt", padding=True)
    with capture_features(model) as feats:
        out = model(**ids, labels=ids["input_ids"])
    loss = out.loss + lam * align_loss(feats, torch.tensor([0, 0, 1, 1, 2, 2]), "kl", mask=ids["attention_mask"])
    loss.backward()
    return torch.cat([l.lora_A.grad.flatten() for l in adapter_layers(model)])


def test_reentrant_checkpointing_drops_alignment_and_is_refused():
    from alignlora.train import train
    # reentrant: the alignment term adds nothing to the gradient; non-reentrant: it does
    assert torch.equal(_align_grads(True, 1.0), _align_grads(True, 0.0))
    assert not torch.allclose(_align_grads(False, 1.0), _align_grads(False, 0.0))
    with pytest.raises(ValueError, match="use_reentrant"):
        train("tiny", "align-lora-kl", ["qnli", "piqa"], n_train=4, k=2, max_steps=1, gradient_checkpointing=True,
              gradient_checkpointing_kwargs={"use_reentrant": True}, progress=False)
    r = train("tiny", "lora", ["qnli", "piqa"], n_train=4, k=2, max_steps=1, max_length=64, gradient_checkpointing=True,
              gradient_checkpointing_kwargs={"use_reentrant": True}, progress=False)   # no alignment: allowed
    assert r.metrics["global_step"] == 1


def test_dataparallel_split_is_avoided(tmp_path):
    from transformers import TrainingArguments
    from alignlora.train import AlignTrainer, pack_collate, segment_attention, _task_id
    from alignlora.data import load_task, encode_many
    model, tok = load_model("tiny"); add_adapters(model, "lora")
    feats = [dict(f, task_id=i) for i, t in enumerate(["qnli", "piqa"])
             for f in encode_many(load_task(t, "train", n=2, seed=0), tok, max_length=64)]
    b = pack_collate(feats, tok.pad_token_id)
    # what nn.DataParallel's scatter does to a packed micro-batch on 2 GPUs: every tensor chunked along dim 0
    replica0 = {k: v.chunk(2)[0] for k, v in b.items()}
    fwd = dict(input_ids=replica0["input_ids"], attention_mask=replica0["attention_mask"],
               position_ids=replica0["position_ids"], cu_seq_lens_q=replica0["cu_seq_lens"])
    with segment_attention(model), pytest.raises(ValueError, match="cu_seq_lens_q must run from 0"):
        model(**fwd)
    # the trainer, seeing 2 GPUs in one process, pins to one device instead of wrapping in DataParallel
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[])
    _ = args.device; args._n_gpu = 2                      # what _setup_devices reports on a 2-GPU node without torchrun
    with pytest.warns(UserWarning, match="CUDA_VISIBLE_DEVICES"):
        tr = AlignTrainer(model=model, args=args, train_dataset=feats, processing_class=tok, task_sizes=[2, 2])
    assert tr.args.n_gpu == 1
    assert not isinstance(tr._wrap_model(tr.model), torch.nn.DataParallel)


def test_trainer_refuses_reentrant_arguments(tmp_path):
    from transformers import TrainingArguments
    from alignlora.train import AlignTrainer
    model, tok = load_model("tiny"); add_adapters(model, "lora")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[],
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        AlignTrainer(model=model, args=args, train_dataset=[dict(input_ids=[1], labels=[1], task_id=t) for t in (0, 0, 1, 1)],
                     processing_class=tok, task_sizes=[2, 2], align="kl", align_lambda=0.2)


OFFLINE_SCRIPT = textwrap.dedent('''
    import sys, torch
    from alignlora.models import load_model, MODELS, ModelEntry
    MODELS["cached-tiny"] = ModelEntry("cached-tiny", "alignlora-test/tiny")     # a registry name whose hub id is cached
    m, tok = load_model("cached-tiny")
    print("SUM", sum(p.double().sum().item() for p in m.parameters()))
    try: load_model("alignlora-test/absent")
    except OSError as e: print("ERR", e)
''')


def test_offline_hf_cache_and_model_map(tmp_path, monkeypatch):
    model, tok = load_model("tiny")
    want = sum(p.double().sum().item() for p in model.parameters())
    snap = tmp_path / "hub" / "models--alignlora-test--tiny" / "snapshots" / ("0" * 40)
    model.save_pretrained(snap); tok.save_pretrained(snap)               # the cache layout huggingface-cli writes
    (snap.parents[1] / "refs").mkdir(); (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = float(p.stdout.split("SUM ")[1].split()[0])
    assert got == want
    err = p.stdout.split("ERR ")[1]
    assert "huggingface-cli download alignlora-test/absent" in err
    assert "ALIGNLORA_MODELS" in err
    # ALIGNLORA_MODELS: a registry name (as the notebooks of `make reproduce` use) read from a local folder
    folder = tmp_path / "q7"; model.save_pretrained(folder); tok.save_pretrained(folder)
    monkeypatch.setenv("ALIGNLORA_MODELS", f"qwen2.5-7b={folder}, other=/nonexistent-but-unused")
    with pytest.raises(FileNotFoundError, match="ALIGNLORA_MODELS maps 'other'"):
        load_model("qwen2.5-7b")
    monkeypatch.setenv("ALIGNLORA_MODELS", f"qwen2.5-7b={folder}")
    m2, _ = load_model("qwen2.5-7b")
    assert sum(p.double().sum().item() for p in m2.parameters()) == want


from alignlora.data import PAPER_TASKS


def test_run_keys_and_paper_training_args(monkeypatch, tmp_path):
    from alignlora.experiments import make_spec, RunSpec, _train_run, get_profile
    from alignlora.train import _training_args
    from dataclasses import replace
    # keys of cpu / smoke specs are those computed before the device class and train args joined the spec
    # (the cpu profile in fp32: its dtype is `auto`, so its keys on a machine with bf16 units name bf16 instead)
    fp32 = {"cpu": replace(get_profile("cpu"), dtype="float32"), "smoke": get_profile("smoke")}
    assert [make_spec(fp32[p], m, PAPER_TASKS).key for p in ("cpu", "smoke") for m in ("lora", "align-lora-kl", "r-lora", "base")] == \
        ['0ebe7810824e', 'a92e1c70a362', '8637edda3fed', 'ef12e623202b', 'c8e6aab6f2f3', 'dc01d5e5f986', 'd06f7c37a6c9', 'a85363f9de78']
    g = make_spec("gpu", "lora", PAPER_TASKS)
    assert g.device == "cuda"
    assert replace(g, device="cpu").key != g.key       # a gpu-profile run is not served from CPU
    with pytest.raises(ValueError, match="device"): replace(g, device="tpu")
    seen = {}
    import alignlora.train as T
    monkeypatch.setattr(T, "train", lambda *a, **kw: seen.setdefault(a[1].name, kw) and None or type("R", (), dict(model=None, tokenizer=None, metrics={}, log=[]))())
    for m in ("lora", "align-lora-kl", "r-lora", "m-lora"):
        _train_run(make_spec("paper", m, PAPER_TASKS), tmp_path, record=False)
    for m, sched, warm in (("lora", "linear", 0), ("align-lora-kl", "linear", 0), ("r-lora", "cosine", 0.03), ("m-lora", "cosine", 0.03)):
        kw = seen[m]
        assert kw["gradient_checkpointing"] is True
        assert kw["learning_rate"] == 2e-4
        assert kw["gradient_accumulation_steps"] == 10
        args = _training_args(tmp_path / m, 1, 5, 0, "cpu", False,
                              {k: kw[k] for k in ("lr_scheduler_type", "warmup_steps", "weight_decay", "gradient_checkpointing")})
        assert (args.lr_scheduler_type.value, args.warmup_steps, args.weight_decay) == (sched, warm, 0.0)
        assert args.gradient_checkpointing
        assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert make_spec("cpu", "lora", PAPER_TASKS).train_args == ()                    # cpu: train()'s defaults, as before


def test_evaluate_leaves_no_cycle_and_run_frees_its_model(tmp_path, monkeypatch):
    from alignlora.eval import evaluate
    import alignlora.experiments as X
    model, tok = load_model("tiny")
    gc.collect(); gc.disable()
    try:
        evaluate(model, tok, ["piqa"], protocol="loglik", limit=2, batch_size=2, progress=False)
        ref = weakref.ref(model); del model
        assert ref() is None, "evaluate kept the model alive through a reference cycle"
    finally: gc.enable()
    refs, orig = [], X._train_run
    def spy(*a, **kw):
        model, tok, timing = orig(*a, **kw); refs.append(weakref.ref(model)); return model, tok, timing
    monkeypatch.setattr(X, "_train_run", spy)
    spec = X.make_spec("smoke", "lora", ["qnli", "piqa"])
    out = X.run(spec, [X.make_eval("smoke", ["piqa"], "loglik")], tmp_path / "runs")
    assert out["evals"]
    assert len(refs) == 1
    assert refs[0]() is None, "the trained model outlived run()"


RUN_DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch
    torch.set_num_threads(1)
    from alignlora import experiments as X
    out = sys.argv[1]
    spec = X.make_spec("smoke", "lora", ["qnli", "piqa"])
    r = X.run(spec, [X.make_eval("smoke", ["piqa"], "loglik")], out + "/runs")
    json.dump(dict(evals=r["evals"], calls=X.CALLS), open(out + f"/rank{os.environ['RANK']}.json", "w"), default=str)
''')


def test_torchrun_run_evaluates_on_rank0_once(tmp_path):
    r0, r1 = torchrun_ranks(RUN_DDP_SCRIPT, tmp_path, port=29523, timeout=900)
    assert r0["evals"] == r1["evals"]
    assert len(r0["evals"]) == 1       # both ranks finish with rank 0's result
    assert r0["calls"] == {"train": 1, "evaluate": 1}
    assert r1["calls"] == {"train": 1, "evaluate": 0}   # trained together
    runs = [d for d in (tmp_path / "runs").iterdir()]
    dirs = [d for d in runs if d.is_dir()]
    assert len(dirs) == 1
    assert (dirs[0] / "TRAINED").exists()
    assert len(list((dirs[0] / "eval").glob("*.done"))) == 1
    assert not [d for d in runs if d.name.endswith(".lock")]
    assert not (dirs[0] / "train.partial").exists()
    log = [json.loads(l) for l in (dirs[0] / "train" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]                        # one writer: each step logged once


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")   # each a device→host sync on a GPU tensor
SYNC_BOUND = {"lora": 0, "align-lora-kl": 8}   # per micro-batch, independent of the number of layers


def test_host_syncs_per_micro_batch(monkeypatch):
    from transformers import AutoModelForCausalLM
    from alignlora.models import model_config
    from alignlora import train as T
    counts, active = [], [False]
    def wrap(n, f):
        def g(self, *a, **kw):
            if active[0]: counts[-1][n] = counts[-1].get(n, 0) + 1
            return f(self, *a, **kw)
        return g
    for n in SYNCS: monkeypatch.setattr(torch.Tensor, n, wrap(n, getattr(torch.Tensor, n)))
    cl = T.AlignTrainer.compute_loss
    def spy(self, *a, **kw):                  # the hot loop: forward, loss, backward-graph building, per micro-batch
        counts.append({}); active[0] = True
        try: return cl(self, *a, **kw)
        finally: active[0] = False
    monkeypatch.setattr(T.AlignTrainer, "compute_loss", spy)
    _, tok = load_model("tiny")
    seen = {}
    for layers in (2, 4):
        cfg = model_config("tiny"); cfg.num_hidden_layers = layers; torch.manual_seed(0)
        for method in SYNC_BOUND:
            counts.clear()
            T.train(AutoModelForCausalLM.from_config(cfg), method, ["qnli", "piqa"], tokenizer=tok, n_train=8, k=4,
                    max_length=64, max_steps=2, progress=False)
            assert len(counts) == 2
            seen[method, layers] = [sum(c.values()) for c in counts]
    for method, bound in SYNC_BOUND.items():
        assert seen[method, 2] == seen[method, 4], seen                    # no sync per layer
        assert max(seen[method, 2]) <= bound, (method, seen)
