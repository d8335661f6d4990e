"Tests of alignlora.eval against independent references: a hand generate loop, a hand log-likelihood loop, lm-eval's own task."
import json, os
from pathlib import Path

import pytest
import torch

DATA = os.environ.get("ALIGNLORA_DATA", "")   # conftest.py points it at ../shared/data when that exists
pytestmark = pytest.mark.skipif(not Path(DATA, "piqa").exists(), reason=f"offline data folder {DATA} not found (set ALIGNLORA_DATA)")

from alignlora import data as D
from alignlora.eval import evaluate, greedy_reference, stop_strings
from alignlora.models import load_model


def varied_tiny(seed):
    "The tiny model with matrices redrawn larger, so that greedy generations are varied text (not one repeated token)."
    m, tok = load_model("tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2: p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return m, tok


@pytest.fixture(scope="module")
def tiny():
    return varied_tiny(1)


def _samples(out):
    return {(s["task"], s["doc_id"]): s["filtered_resps"][0] for s in map(json.loads, open(Path(out) / "samples.jsonl"))}


def test_generate_equals_hand_loop_at_default_caps(tiny, tmp_path):
    "20 rows per task at the protocol's own caps (GSM8K 128 new tokens, BBH 256 with stops): text for text."
    m, tok = tiny
    spec = {"gsm8k": 20, "bbh/boolean_expressions": 10}
    for name, n in spec.items():
        out = tmp_path / name.replace("/", "_")
        res = evaluate(m, tok, [name], "generate", limit=n, batch_size=4, data_dir=DATA, output_dir=out, progress=False)
        rows = D.load_task(name, "eval", n=n, data_dir=DATA)
        ref = greedy_reference(m, tok, rows, 256 if name.startswith("bbh/") else 128, stop_strings(name))
        gen = _samples(out)
        assert [gen[(name, i)] for i in range(n)] == [t for t, _ in ref]
        assert res[name]["per_example"] == [[r["id"], c] for r, (_, c) in zip(rows, ref)]
        assert res[name]["parse_rate"] == sum(D.extract_answer(name, t) is not None for t, _ in ref) / n
    assert len({t for t, _ in ref}) > 1, "reference generations should differ between rows"


def test_generate_batch_size_invariant(tiny, tmp_path):
    "Left-padded batched generation gives the same texts as batch size 1."
    m, tok = tiny
    tasks = ["piqa", "arc", "bbh/navigate"]
    r1 = evaluate(m, tok, tasks, "generate", limit=8, batch_size=1, max_new_tokens=24, data_dir=DATA, output_dir=tmp_path / "b1", progress=False)
    r4 = evaluate(m, tok, tasks, "generate", limit=8, batch_size=4, max_new_tokens=24, data_dir=DATA, output_dir=tmp_path / "b4", progress=False)
    assert _samples(tmp_path / "b1") == _samples(tmp_path / "b4")
    assert all(r1[t]["per_example"] == r4[t]["per_example"] for t in tasks)


def _hand_loglik(m, tok, ex):
    "Sum of log-probabilities of each choice after the prompt (its trailing space moved onto the choice); argmax index."
    ctx = ex["prompt"].rstrip(" ")
    scores = []
    for c in ex["choices"]:
        ci = tok(ctx)["input_ids"]; wi = tok(ex["prompt"] + c)["input_ids"]
        assert wi[:len(ci)] == ci
        ids = torch.tensor([wi])
        with torch.no_grad(): lp = torch.log_softmax(m(ids).logits[0].double(), -1)
        scores.append(sum(lp[i - 1, wi[i]].item() for i in range(len(ci), len(wi))))
    return max(range(len(scores)), key=scores.__getitem__)


def test_loglik_equals_hand_loop(tiny):
    m, tok = tiny
    for name in ["piqa", "arc_easy", "qnli"]:
        rows = D.load_task(name, "eval", n=20, data_dir=DATA)
        res = evaluate(m, tok, [name], "loglik", limit=20, batch_size=4, data_dir=DATA, progress=False)[name]
        hand = [_hand_loglik(m, tok, ex) == ex["choices"].index(ex["answer"]) for ex in rows]
        assert res["per_example"] == [[ex["id"], h] for ex, h in zip(rows, hand)], name
        assert abs(res["acc"] - sum(hand) / 20) < 1e-12


def test_stock_arc_easy_equals_lm_eval_builtin(tiny, tmp_path):
    "Our `stock` ARC-Easy = lm-eval's registered arc_easy run directly with dataset_path: json on the same rows."
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml
    m, tok = tiny
    rows = D.load_task("arc_easy", "eval", n=20, data_dir=DATA)
    ours = evaluate(m, tok, ["arc_easy"], "stock", limit=20, data_dir=DATA, progress=False)["arc_easy"]
    f = tmp_path / "rows.jsonl"; f.write_text("".join(json.dumps(r["raw"]) + "\n" for r in rows))
    cfg = load_yaml(TaskManager().task_index["arc_easy"].yaml_path)  # the built-in definition, found by lm-eval's index
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {"test": str(f)}},
               training_split=None, validation_split=None)
    direct = lm_eval.simple_evaluate(model=HFLM(pretrained=m, tokenizer=tok, batch_size=2), tasks=[cfg])
    assert ours["acc"] == direct["results"]["arc_easy"]["acc,none"]
    assert ours["acc_norm"] == direct["results"]["arc_easy"]["acc_norm,none"]
    per = [bool(s["acc"]) for s in sorted(direct["samples"]["arc_easy"], key=lambda s: s["doc_id"])]
    assert [c for _, c in ours["per_example"]] == per
    assert ours["n"] == 20


def test_outputs_and_result_shape(tiny, tmp_path):
    m, tok = tiny
    m.train()
    res = evaluate(m, tok, ["bbh/navigate", "bbh/snarks"], "loglik", limit=5, data_dir=DATA, output_dir=tmp_path, progress=False)
    assert m.training, "evaluate must restore the model's training mode"
    json.dumps(res)  # the run cache stores results as JSON
    b = res["bbh"]
    assert b["acc"] == (res["bbh/navigate"]["acc"] + res["bbh/snarks"]["acc"]) / 2
    assert b["n"] == 10
    assert b["subtasks"] == 2
    assert [i for i, _ in res["bbh/navigate"]["per_example"]] == [e["id"] for e in D.load_task("bbh/navigate", "eval", n=5, data_dir=DATA)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "samples.jsonl"]  # no temp files left
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0].startswith("task,protocol,acc")
    assert len(lines) == 4
    assert "alignlora_loglik_bbh_navigate" in json.loads((tmp_path / "results.json").read_text())["results"]


def test_clear_errors(tiny):
    m, tok = tiny
    with pytest.raises(ValueError, match="generate"): evaluate(m, tok, ["gsm8k"], "loglik", limit=2, data_dir=DATA)
    with pytest.raises(ValueError, match="protocol"): evaluate(m, tok, ["piqa"], "greedy", limit=2, data_dir=DATA)
    with pytest.raises(KeyError, match="Unknown task"): evaluate(m, tok, ["hellaswag"], limit=2, data_dir=DATA)


OLD_PATH = dict(merge=False, shared_prompt=False, prefix_cache=False, contiguous_head=False)


@pytest.fixture(scope="module")
def tiny_lora():
    "The varied tiny model with a `lora` adapter whose B is non-zero (a fresh adapter would be a no-op)."
    from alignlora.adapters import add_adapters, adapter_layers
    from alignlora.methods import get_method
    m, tok = varied_tiny(2)
    torch.manual_seed(0); add_adapters(m, get_method("lora"))
    with torch.no_grad():
        for l in adapter_layers(m): l.lora_B.normal_(0, 0.1)
    return m.eval(), tok


@pytest.mark.parametrize("protocol,tasks,kw", [
    ("generate", D.PAPER_TASKS, dict(limit=6, max_new_tokens=16)),
    ("loglik", ["qnli", "piqa", "winogrande", "arc"], dict(limit=10)),
    ("generate", ["bbh/navigate", "bbh/date_understanding", "bbh/word_sorting"], dict(limit=3, max_new_tokens=24))])
def test_fast_path_equals_old_path(tiny_lora, tmp_path, protocol, tasks, kw):
    "evaluate's defaults (merge, shared_prompt, prefix_cache on fp32 weights) against lm-eval's HFLM as it is: row for row."
    m, tok = tiny_lora
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = {}
    for name, variant in (("old", OLD_PATH), ("new", dict())):   # the defaults: every rewrite on these fp32 weights
        res = evaluate(m, tok, tasks, protocol, batch_size=4, data_dir=DATA, output_dir=tmp_path / name, progress=False, **kw, **variant)
        out[name] = res, sorted(map(json.loads, open(tmp_path / name / "samples.jsonl")), key=lambda s: (s["task"], s["doc_id"]))
    (old, so), (new, sn) = out["old"], out["new"]
    assert all(old[t]["per_example"] == new[t]["per_example"] for t in tasks)
    if protocol == "generate": assert [s["filtered_resps"] for s in so] == [s["filtered_resps"] for s in sn]
    else: assert max(abs(float(a[0][0]) - float(b[0][0])) for x, y in zip(so, sn) for a, b in zip(x["resps"], y["resps"])) < 1e-4
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())   # merged for the call only, restored exactly


def test_prefix_greedy_equals_hand_loop(tiny_lora):
    from alignlora.eval import prefix_greedy
    m, tok = tiny_lora
    prefix = tok("A shared few-shot prefix, long enough to share. " * 6)["input_ids"]
    sufs = [tok(s)["input_ids"] for s in ("Q: one? A:", "Q: a second, longer question? A:", "Q: 3")]
    first = []
    with torch.no_grad():   # stop each row at a token it really generates (its 3rd + row index): rows finish at different steps
        for r, s in enumerate(sufs):
            ids = prefix + s
            for _ in range(3 + r): ids = ids + [int(m(torch.tensor([ids])).logits[0, -1].argmax())]
            first.append(ids[-1])
    got = prefix_greedy(m, prefix, sufs, 10, lambda t: t[-1] in first)
    for s, g in zip(sufs, got):
        ref = []
        with torch.no_grad():
            while len(ref) < 10 and not (ref and ref[-1] in first):
                ref.append(int(m(torch.tensor([prefix + s + ref])).logits[0, -1].argmax()))
        assert g == ref


def test_no_newline_stop_for_label_tasks():
    "Why label tasks keep lm-eval's stopping: the scorer reads after the last `Answer:`, so text after a newline counts."
    swap = {"entailment": "not_entailment", "not_entailment": "entailment", "solution1": "solution2", "solution2": "solution1",
            "option1": "option2", "option2": "option1", **{c: "ABCDE"[("ABCDE".index(c) + 1) % 5] for c in "ABCDE"}}
    for name in ["qnli", "piqa", "winogrande", "arc", "gsm8k"]:
        for ex in D.load_task(name, "eval", n=30, data_dir=DATA):
            gold = str(ex["answer"]); wrong = swap[gold] if name != "gsm8k" else str(float(gold) + 1)
            assert D.score(name, gold, ex)
            assert not D.score(name, gold + "\nAnswer: " + wrong, ex)
            assert D.score(name, "\n" + gold, ex)


# --- backend='vllm': the plumbing, with lm-eval's VLLM class replaced by a stand-in (vLLM needs a CUDA machine) ---
import importlib.util, sys, types
from dataclasses import asdict
from alignlora.eval import BACKENDS, VLLM_LORA_RANKS, pick_backend


@pytest.fixture
def vllm_present(monkeypatch):
    "`find_spec('vllm')` answers as if vLLM were installed."
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: object() if n == "vllm" else real(n, *a, **k))


@pytest.fixture
def vllm_absent(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == "vllm" else real(n, *a, **k))


def _fake_vllm_module(captured: dict, apply_lora: bool = True):
    """A `lm_eval.models.vllm_causallms` whose `VLLM` records its arguments and serves `pretrained` from disk with the
    LoRA at `lora_local_path` read by stock PEFT (HFLM underneath); `apply_lora=False` keeps the request but serves the
    base model, as in lm-eval #2432."""
    from lm_eval.models.huggingface import HFLM
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class FakeVLLM(HFLM):
        def __init__(self, pretrained, lora_local_path=None, **kw):
            captured.update(kw, pretrained=pretrained, lora_local_path=lora_local_path)
            m = AutoModelForCausalLM.from_pretrained(pretrained)
            if lora_local_path is not None:
                captured["peft_r"] = PeftConfig.from_pretrained(lora_local_path).r
                m = PeftModel.from_pretrained(m, lora_local_path)
            super().__init__(pretrained=m.eval(), tokenizer=AutoTokenizer.from_pretrained(pretrained), batch_size=4)
            self.lora_request = types.SimpleNamespace(lora_path=lora_local_path) if lora_local_path else None

        def _serve(self, fn, *a, **k):
            if not hasattr(self.model, "disable_adapter") or (self.lora_request is not None and apply_lora): return fn(*a, **k)
            with self.model.disable_adapter(): return fn(*a, **k)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            captured.setdefault("probes", []).append(self.lora_request is not None)
            return self._serve(super()._loglikelihood_tokens, requests, disable_tqdm, override_bs)

        def generate_until(self, requests, disable_tqdm=False):
            return self._serve(super().generate_until, requests, disable_tqdm)

    mod = types.ModuleType("lm_eval.models.vllm_causallms"); mod.VLLM = FakeVLLM
    return mod


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    "The tiny model with weights redrawn, saved as a transformers folder (vLLM's `base`), then with a non-zero `lora`."
    from alignlora.adapters import add_adapters, adapter_layers
    from alignlora.methods import get_method
    m, tok = varied_tiny(3)
    base = tmp_path_factory.mktemp("base")
    m.save_pretrained(base); tok.save_pretrained(base)
    torch.manual_seed(0); add_adapters(m, get_method("lora-r9"))
    with torch.no_grad():
        for l in adapter_layers(m): l.lora_B.normal_(0, 0.3)
    return m.eval(), tok, str(base)


def test_vllm_path_passes_the_lora_and_parses_like_hf(saved_lora, vllm_present, monkeypatch, tmp_path):
    "The args lm-eval's VLLM gets, and its results through the shared parsing: row for row the hf backend's."
    m, tok, base = saved_lora
    got = {}
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", _fake_vllm_module(got))
    kw = dict(limit=4, max_new_tokens=12, data_dir=DATA, progress=False)
    tasks = ["piqa", "gsm8k"]
    v = evaluate(m, tok, tasks, backend="vllm", base=base, output_dir=tmp_path / "vllm", **kw)
    h = evaluate(m, tok, tasks, backend="hf", output_dir=tmp_path / "hf", **kw, **OLD_PATH)
    assert got["pretrained"] == base
    assert got["enable_lora"] is True
    assert got["peft_r"] == 9                              # stock PEFT reads the exported adapter at its rank
    assert got["max_lora_rank"] in VLLM_LORA_RANKS
    assert got["max_lora_rank"] >= got["peft_r"]
    assert got["max_lora_rank"] == 16                      # the smallest accepted value that holds r = 9
    assert got["dtype"] == "float32"
    assert got["probes"][:2] == [True, False]              # the guard compared with and without the LoRA request
    assert all(v[t]["per_example"] == h[t]["per_example"] for t in tasks)
    assert _samples(tmp_path / "vllm") == _samples(tmp_path / "hf")


def test_vllm_adapter_changes_the_generations(saved_lora, vllm_present, monkeypatch, tmp_path):
    "What the previous test compares is not the base model's output (the adapter moves the generated text)."
    m, tok, base = saved_lora
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", _fake_vllm_module({}))
    from transformers import AutoModelForCausalLM
    bare = AutoModelForCausalLM.from_pretrained(base).eval()
    kw = dict(limit=4, max_new_tokens=12, data_dir=DATA, progress=False)
    evaluate(m, tok, ["gsm8k"], backend="vllm", base=base, output_dir=tmp_path / "lora", **kw)
    evaluate(bare, tok, ["gsm8k"], backend="vllm", base=base, output_dir=tmp_path / "bare", **kw)
    assert _samples(tmp_path / "lora") != _samples(tmp_path / "bare")


def test_vllm_guard_catches_a_dropped_lora(saved_lora, vllm_present, monkeypatch):
    "lm-eval #2432: a LoRA request that vLLM does not apply raises instead of scoring the base model."
    m, tok, base = saved_lora
    monkeypatch.setitem(sys.modules, "lm_eval.models.vllm_causallms", _fake_vllm_module({}, apply_lora=False))
    with pytest.raises(RuntimeError, match="2432"):
        evaluate(m, tok, ["piqa"], limit=2, max_new_tokens=4, backend="vllm", base=base, data_dir=DATA, progress=False)


def test_vllm_errors_before_any_work(saved_lora, vllm_absent):
    "Raised before the rows are read: a data folder that does not exist is never reached."
    m, tok, base = saved_lora
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lm-eval\[vllm\]'"):
        evaluate(m, tok, ["piqa"], backend="vllm", base=base, data_dir="/nonexistent")
    with pytest.raises(KeyError, match="backend"):
        evaluate(m, tok, ["piqa"], backend="vlm", data_dir="/nonexistent")


def test_vllm_refuses_routed_and_baseless_models(vllm_present):
    from alignlora.adapters import add_adapters
    from alignlora.methods import get_method
    for method in ("hydralora", "loramoe", "r-lora"):
        m, tok = load_model("tiny"); add_adapters(m, get_method(method))
        with pytest.raises(ValueError, match=rf"{method}\b.*backend='hf'"):
            evaluate(m, tok, ["piqa"], backend="vllm", base="some/base", data_dir="/nonexistent")
    m, tok = load_model("tiny")   # built in memory: no _name_or_path for vLLM to load
    with pytest.raises(ValueError, match="base="): evaluate(m, tok, ["piqa"], backend="vllm", data_dir="/nonexistent")
    with pytest.raises(ValueError, match="prefix_cache"):
        evaluate(m, tok, ["piqa"], backend="vllm", base="some/base", prefix_cache=True, data_dir="/nonexistent")


# --- the backend in profiles and evaluation specs ---
def test_profile_backend_with_and_without_vllm(monkeypatch):
    from alignlora import experiments as X
    real = importlib.util.find_spec
    for present, want in ((True, "vllm"), (False, "hf")):
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, _p=present, **k: (object() if _p else None) if n == "vllm" else real(n, *a, **k))
        assert {n: X.make_eval(n, ["piqa"]).backend for n in X.PROFILES} == {"smoke": "hf", "cpu": "hf", "gpu": want, "paper": want}
        assert X.eval_backend_for("gpu", "lora") == want
        assert X.eval_backend_for("paper", "hydralora") == "hf"        # routed: hf whatever the profile says
        assert X.eval_backend_for(X.PROFILES["gpu"], "base") == want
    assert all(p.report_to == () for p in X.PROFILES.values())


def test_eval_spec_backend_checked_and_key_stable(vllm_present):
    import hashlib, json
    from alignlora import experiments as X
    e = X.make_eval("cpu", ["piqa", "gsm8k"], "generate")
    old = {k: v for k, v in asdict(e).items() if k != "backend"}   # the fields EvalSpec had before `backend`
    old_key = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":"), default=list).encode()).hexdigest()[:12]
    assert e.backend == "hf"
    assert e.key == old_key
    v = X.make_eval("cpu", ["piqa", "gsm8k"], "generate", backend="vllm")
    assert v.backend == "vllm"
    assert v.key != e.key
    with pytest.raises(KeyError, match="backend"): X.EvalSpec(tasks=("piqa",), backend="auto")
    assert BACKENDS == ("hf", "vllm")
    assert pick_backend("auto") == "vllm"
