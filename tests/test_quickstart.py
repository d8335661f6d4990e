"""The README's quick-start, run as written, with one substitution: `smollm2-135m` → `tiny` (the random llama with
SmolLM2's tokenizer that the smoke profile uses), so it runs in under a minute. The exported adapter must load in
stock PEFT and give our model's logits."""
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SUBSTITUTIONS = {'"smollm2-135m"': '"tiny"'}


def quickstart_code() -> str:
    "The first python block after the README's `## Quick start` heading, with `SUBSTITUTIONS` applied."
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for old, new in SUBSTITUTIONS.items():
        assert old in code, f"the quick-start no longer names {old}"
        code = code.replace(old, new)
    return code


def test_quickstart_runs_and_exports_to_stock_peft(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                   # the quick-start writes its adapter folder here
    ns = {}
    exec(compile(quickstart_code(), "README.md quick-start", "exec"), ns)
    run, scores, peft_model = ns["run"], ns["scores"], ns["peft_model"]
    assert sorted(scores) == sorted(ns["PAPER_TASKS"])
    for task, s in scores.items():
        assert s["n"] == 8, task
        assert 0.0 <= s["acc"] <= 1.0, task
    batch = run.tokenizer(["Align, don't divide.", "One shared A, aligned across tasks."], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = run.model(**batch).logits
        theirs = peft_model.eval()(**batch).logits
        base = ns["load_model"]("tiny")[0](**batch).logits
    assert (ours - base).abs().max().item() > 1e-3      # training moved the model, so the comparison below means something
    assert (ours - theirs).abs().max().item() < 1e-4    # stock PEFT reproduces our adapter (fp32)
