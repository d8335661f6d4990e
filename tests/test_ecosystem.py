"""Agreement with stock tools: a LoRA run exported by `alignlora.hub.export_run`, loaded by lm-eval's own `hf` model
through PEFT (`pretrained=<base folder>,peft=<export>`), gets the same per-row answers and the same accuracy on our
task YAMLs as `alignlora.eval.evaluate` on the in-memory model with its default fast paths (merged adapters, packed
log-likelihoods)."""
import dataclasses, json

import pytest
import torch

import lm_eval
from lm_eval.tasks import TaskManager

from alignlora.data import load_task
from alignlora.eval import _eval_rows, _write_task_folder, evaluate, greedy_reference, lm_task_name
from alignlora.experiments import load_run, make_spec, run
from alignlora.hub import export_run
from alignlora.models import load_model

TASK, SEED = "piqa", 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    "A trained tiny `lora` run, its base model saved where stock HF loads it, and its export."
    d = tmp_path_factory.mktemp("ecosystem")
    spec = dataclasses.replace(make_spec("smoke", "lora", ["piqa", "qnli"]), lr=2e-2, max_steps=6)
    run(spec, runs_dir_=d / "runs")
    base, tok = load_model(spec.model)          # the same seeded init `load_run` builds the run on
    base.save_pretrained(d / "base"); tok.save_pretrained(d / "base")
    out = export_run(spec, d / "export", runs_dir=d / "runs", base_model_name_or_path=str(d / "base"))
    model, tok = load_run(spec, d / "runs")
    return dict(dir=d, spec=spec, model=model, tok=tok, export=out, base=base)


def _samples(path, task: str) -> dict:
    "{doc_id: lm-eval sample} of one task in a samples.jsonl written by `evaluate(output_dir=...)`."
    return {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines()) if s["task"] == task}


def _stock(ex, protocol: str, limit: int, batch_size: int, max_new_tokens=None):
    "Stock lm-eval (`model='hf'` + `peft=`) on our task YAML for TASK: (its results for the task, {doc_id: sample})."
    rows = _eval_rows(protocol, limit, batch_size, max_new_tokens, [TASK], SEED, None)
    folder = ex["dir"] / f"tasks-{protocol}"; folder.mkdir()
    names = _write_task_folder(folder, rows, protocol, None, max_new_tokens)   # the helper evaluate() writes with
    raw = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={ex['dir'] / 'base'},peft={ex['export']},dtype={ex['spec'].dtype}",
        tasks=list(names.values()), task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        batch_size=batch_size, device="cpu", log_samples=True, random_seed=SEED, numpy_random_seed=SEED,
        torch_random_seed=SEED, fewshot_random_seed=SEED)
    t = names[TASK]
    return raw["results"][t], {s["doc_id"]: s for s in raw["samples"][t]}


def test_export_is_the_trained_model(exported):
    "The saved base is the run's base, and the trained adapter is not a no-op (else agreement would prove little)."
    ours, base = exported["model"], exported["base"]
    want = base.state_dict()
    frozen = {k.replace(".base.", "."): v for k, v in ours.state_dict().items() if not any(x in k for x in ("lora_", "router", "offset"))}
    assert set(frozen) == set(want)
    assert all(torch.equal(v, want[k]) for k, v in frozen.items())
    ids = exported["tok"]("Question: which is heavier? Answer:", return_tensors="pt").input_ids
    with torch.no_grad(): delta = (ours(ids).logits - base(ids).logits).abs().max()
    assert delta > 1e-3


def test_stock_lm_eval_agrees_loglik(exported, tmp_path):
    n, bs = 40, 8
    ours = evaluate(exported["model"], exported["tok"], [TASK], protocol="loglik", limit=n, batch_size=bs,
                    seed=SEED, output_dir=tmp_path, progress=False)[TASK]
    mine = _samples(tmp_path / "samples.jsonl", TASK)
    res, stock = _stock(exported, "loglik", n, bs)
    assert sorted(stock) == sorted(mine) == list(range(n))
    for i in range(n):   # the chosen answer of every row (argmax over the choices' log-likelihoods)
        lo = [r[0] for r in mine[i]["filtered_resps"]]; ls = [float(r[0]) for r in stock[i]["filtered_resps"]]
        assert max(range(len(lo)), key=lo.__getitem__) == max(range(len(ls)), key=ls.__getitem__), f"row {i}: {lo} vs {ls}"
        # fp32 both ways; merged + packed (ours) vs PEFT unmerged + padded batches (stock): 2e-6 apart when written
        assert max(abs(a - b) for a, b in zip(lo, ls)) < 1e-4, f"row {i}: {lo} vs {ls}"
        assert bool(stock[i]["acc"]) == bool(mine[i]["acc"])
    assert res["acc,none"] == ours["acc"]
    assert 0 < ours["acc"] < 1, "a row of each kind: some right, some wrong"


def test_stock_lm_eval_agrees_generate(exported, tmp_path):
    n, bs, cap = 20, 8, 12
    ours = evaluate(exported["model"], exported["tok"], [TASK], protocol="generate", limit=n, batch_size=bs,
                    seed=SEED, output_dir=tmp_path, progress=False, max_new_tokens=cap)[TASK]
    mine = _samples(tmp_path / "samples.jsonl", TASK)
    res, stock = _stock(exported, "generate", n, bs, max_new_tokens=cap)
    assert sorted(stock) == sorted(mine) == list(range(n))
    for i in range(n):   # the same generated text, scored the same way
        assert stock[i]["filtered_resps"] == mine[i]["filtered_resps"], f"row {i}"
        assert stock[i]["acc"] == mine[i]["acc"]
    assert res["acc,none"] == ours["acc"]
    # the tiny model gives every row the same text; that text is the adapter's (the base alone writes another)
    base_text = [t for t, _ in greedy_reference(exported["base"], exported["tok"], load_task(TASK, "eval", n=n, seed=SEED)[:2], cap)]
    assert base_text != [mine[i]["filtered_resps"][0] for i in range(2)]
    assert lm_task_name(TASK, "generate") in json.loads((tmp_path / "results.json").read_text())["results"]
