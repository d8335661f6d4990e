"Tests of alignlora.eval against independent references: a hand generate loop, a hand log-likelihood loop, lm-eval's own task."
import json, os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
DATA = os.environ.get("ALIGNLORA_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = pytest.mark.skipif(not Path(DATA, "piqa").exists(), reason=f"offline data folder {DATA} not found (set ALIGNLORA_DATA)")

from alignlora import data as D
from alignlora.eval import evaluate, greedy_reference, stop_strings
from alignlora.models import load_model


@pytest.fixture(scope="module")
def tiny():
    "The tiny model with matrices redrawn larger, so that greedy generations are varied text (not one repeated token)."
    m, tok = load_model("tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2: p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return m, tok


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
    assert [c for _, c in ours["per_example"]] == per and ours["n"] == 20


def test_outputs_and_result_shape(tiny, tmp_path):
    m, tok = tiny
    m.train()
    res = evaluate(m, tok, ["bbh/navigate", "bbh/snarks"], "loglik", limit=5, data_dir=DATA, output_dir=tmp_path, progress=False)
    assert m.training, "evaluate must restore the model's training mode"
    json.dumps(res)  # the run cache stores results as JSON
    b = res["bbh"]
    assert b["acc"] == (res["bbh/navigate"]["acc"] + res["bbh/snarks"]["acc"]) / 2 and b["n"] == 10 and b["subtasks"] == 2
    assert [i for i, _ in res["bbh/navigate"]["per_example"]] == [e["id"] for e in D.load_task("bbh/navigate", "eval", n=5, data_dir=DATA)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "samples.jsonl"]  # no temp files left
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert lines[0].startswith("task,protocol,acc") and len(lines) == 4
    assert "alignlora_loglik_bbh_navigate" in json.loads((tmp_path / "results.json").read_text())["results"]


def test_clear_errors(tiny):
    m, tok = tiny
    with pytest.raises(ValueError, match="generate"): evaluate(m, tok, ["gsm8k"], "loglik", limit=2, data_dir=DATA)
    with pytest.raises(ValueError, match="protocol"): evaluate(m, tok, ["piqa"], "greedy", limit=2, data_dir=DATA)
    with pytest.raises(KeyError, match="Unknown task"): evaluate(m, tok, ["hellaswag"], limit=2, data_dir=DATA)
