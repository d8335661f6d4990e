"Tests of alignlora.data against the offline data folder: counts, prompts, scoring, leakage, tokenisation, batches."
import hashlib, json, os, re, warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import numpy as np
import pytest
import torch

from alignlora import data as D

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ALIGNLORA_DATA") or ROOT.parent / "shared" / "data")
pytestmark = pytest.mark.skipif(not (DATA / "MANIFEST.tsv").exists(), reason=f"offline data folder {DATA} not found")
NON_BBH = [n for n in D.TASKS if not n.startswith("bbh/")]
# upstream train rows whose question (and set of choices) is also in the eval split; the loader drops them
DROPPED = {"arc_easy": 3, "arc": 3, "openbookqa": 14}


def manifest():
    rows = [l.split("\t") for l in (DATA / "MANIFEST.tsv").read_text().splitlines()[1:] if l.strip()]
    return {p: (int(n), sha) for p, n, sha in rows}


def load(name, split="train", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return D.load_task(name, split, data_dir=DATA, **kw)


@pytest.fixture(scope="module")
def tok():
    from alignlora.models import load_model
    return load_model("tiny")[1]


# ---------------------------------------------------------------- registry and counts
def test_manifest_files_intact():
    for p, (n, sha) in manifest().items():
        b = (DATA / p).read_bytes()
        assert hashlib.sha256(b).hexdigest() == sha, p
        assert sum(1 for l in b.split(b"\n") if l.strip()) == n, p  # not splitlines(): rows hold U+2028


def test_every_task_and_split_counts_equal_manifest():
    m = manifest()
    seen = set()
    for name, t in D.TASKS.items():
        for split in t.splits:
            parts = [D.TASKS[p] for p in t.parts] or [t]
            want = sum(m[f"{p.local_dir}/{split}.jsonl"][0] for p in parts)
            seen |= {f"{p.local_dir}/{split}.jsonl" for p in parts}
            assert len(load(name, split, dedupe=False)) == want, (name, split)
        if t.train_split:
            assert len(load(name, "train")) == len(load(name, "train", dedupe=False)) - DROPPED.get(name, 0), name
        assert len(load(name, "eval")) == len(load(name, t.eval_split))
    assert seen == set(m), set(m) ^ seen  # every file of the manifest belongs to a registered task


def test_registry_shape():
    assert D.PAPER_TASKS == ["qnli", "piqa", "winogrande", "arc", "gsm8k"]
    assert D.EIGHT_TASKS == ["qnli", "piqa", "winogrande", "arc_easy", "arc_challenge", "gsm8k", "openbookqa", "rte"]
    assert len(D.BBH_TASKS) == 27
    assert len(set(D.BBH_TASKS)) == 27
    assert all(n in D.TASKS for n in D.BBH_TASKS)
    evals = {n: D.TASKS[n].eval_split for n in D.EIGHT_TASKS + ["arc"]}
    assert evals == dict(qnli="validation", piqa="validation", winogrande="validation", arc="test", arc_easy="test",
                         arc_challenge="test", gsm8k="test", openbookqa="test", rte="validation")
    assert all(D.TASKS[n].eval_split == "test" and D.TASKS[n].train_split is None for n in D.BBH_TASKS)
    fam = {n: D.TASKS[n].family for n in NON_BBH}
    assert fam == dict(qnli="classify", rte="classify", piqa="option", winogrande="option", arc="letter", arc_easy="letter",
                       arc_challenge="letter", openbookqa="letter", gsm8k="number")


def test_examples_well_formed():
    for name in D.TASKS:
        for split in ("eval",) + (("train",) if D.TASKS[name].train_split else ()):
            for e in load(name, split):
                assert set(e) >= {"task", "prompt", "target", "answer", "choices", "id", "raw"}
                assert e["task"] == name
                assert e["prompt"].endswith("Answer: ")
                assert e["target"].strip()
                assert e["id"] == D.example_id(name, e["prompt"], e["answer"])
                if e["choices"] is not None: assert e["answer"] in e["choices"], (name, e["id"])
                if D.TASKS[name].family != "number" and D.TASKS[name].family != "bbh": assert e["target"] == e["answer"]
    # choices are None exactly for GSM8K, free-form BBH, and 4 corrupt upstream BBH rows (text gold, a single option)
    none = Counter(e["task"] for n in D.BBH_TASKS for e in load(n, "eval") if e["choices"] is None)
    assert none == {"bbh/dyck_languages": 250, "bbh/word_sorting": 250, "bbh/object_counting": 250,
                    "bbh/multistep_arithmetic_two": 250, "bbh/movie_recommendation": 1, "bbh/ruin_names": 2, "bbh/snarks": 1}


def test_subsample_seeded_and_nested():
    a, b = load("winogrande", n=50, seed=3), load("winogrande", n=50, seed=3)
    assert a == b
    assert len(a) == 50
    assert a != load("winogrande", n=50, seed=4)
    big = {e["id"] for e in load("winogrande", n=200, seed=3)}
    assert {e["id"] for e in a} <= big
    full = load("winogrande")
    pos = [full.index(e) for e in a]
    assert pos == sorted(pos)  # file order
    assert len(load("rte", n=10**6)) == len(load("rte"))


# ---------------------------------------------------------------- prompts (verbatim, paper notes §3)
# The wording is checked against the paper's specification file beside the repository; skipped without it.
SPEC = ROOT.parent / "shared" / "spec" / "PAPER.md"
def paper_templates():
    txt = SPEC.read_text()
    out = {}
    for key, task in [("QNLI", "qnli"), ("PIQA", "piqa"), ("WinoGrande", "winogrande"), ("ARC (Easy", "arc"), ("GSM8K", "gsm8k")]:
        line = next(l for l in txt.splitlines() if l.strip().startswith(f"- {key}"))
        out[task] = re.search(r"`(.*?)` →", line).group(1).replace("\\n", "\n")
    return out


@pytest.mark.skipif(not SPEC.exists(), reason="spec not found")
def test_paper_prompts_verbatim():
    T = paper_templates()
    for task, tpl in T.items():
        for e in load(task, "eval", n=20):
            r = e["raw"]
            if task == "arc":
                letters = "ABCDE"[:len(r["choices"]["text"])]
                tpl2 = tpl.replace("A) …, B) …, C) …, D) …", ", ".join(f"{l}) {t}" for l, t in zip(letters, r["choices"]["text"])))
                tpl2 = tpl2.replace("A/B/C/D", "/".join(letters))
                want = tpl2.format(question=r["question"])
            else:
                want = tpl.format(**r)
            assert e["prompt"] == want, (task, e["prompt"], want)
    assert T["qnli"].endswith("Answer: ")


def test_targets():
    for e in load("gsm8k", n=50):
        assert e["target"] == e["raw"]["answer"]
        assert re.search(r"#### -?[\d,]+$", e["target"])
        assert e["answer"] == e["target"].split("####")[1].strip().replace(",", "")
    # ARC rows with keys 1..4 are answered by letter, by position
    num = [e for e in load("arc", "eval") if e["raw"]["choices"]["label"][0] == "1"]
    assert len(num) == 97 + 22  # ARC-Easy test + ARC-Challenge test rows labelled 1..n
    for e in num: assert e["answer"] == "ABCDE"[int(e["raw"]["answerKey"]) - 1] and "A) " in e["prompt"]
    q = {e["raw"]["label"]: e["target"] for e in load("qnli", n=50)}
    assert q == {0: "entailment", 1: "not_entailment"}
    assert {e["raw"]["answer"]: e["target"] for e in load("winogrande", n=50)} == {"1": "option1", "2": "option2"}
    assert {e["raw"]["label"]: e["target"] for e in load("piqa", n=50)} == {0: "solution1", 1: "solution2"}


# ---------------------------------------------------------------- scoring
def test_gold_target_scores_and_wrong_choice_does_not():
    "For every eval row of every task, generating the target scores True; another choice scores False."
    rng = np.random.default_rng(0)
    for name in D.TASKS:
        exs = load(name, "eval")
        ok = sum(D.score(name, e["target"], e) for e in exs)
        assert ok == len(exs), (name, ok, len(exs))
        assert all(D.score(name, "Answer: " + e["target"], e) for e in exs[:20])
        for e in exs:
            if e["choices"]:
                wrong = [c for c in e["choices"] if c != e["answer"]]
                assert not D.score(name, str(rng.choice(wrong)), e), (name, e["id"])
        if name == "gsm8k":
            assert not any(D.score(name, f"#### {int(e['answer']) + 1}", e) for e in exs)


def test_scoring_awkward_cases():
    G = lambda a: {"answer": a}
    cases = [
        ("gsm8k", "1000 + 234\n#### 1,234", "1234", True), ("gsm8k", "so \\boxed{12}", "12", True),
        ("gsm8k", "The answer is 7.", "7", True), ("gsm8k", "The answer is $1,000.00", "1000", True),
        ("gsm8k", "#### -5", "-5", True), ("gsm8k", "3 + 4 = 7\n#### 8", "7", False), ("gsm8k", "\\boxed{3}", "4", False),
        ("gsm8k", "2.5", "2.50", True),
        ("arc", "3", "C", True), ("arc", "(B)", "B", True), ("arc", "D) the moon", "D", True), ("arc", "The answer is A", "A", True),
        ("arc", "3", "B", False), ("openbookqa", "b", "B", False), ("arc_challenge", "E", "E", True),
        ("piqa", "Solution2", "solution2", True), ("piqa", "SOLUTION 1", "solution1", True), ("piqa", "2", "solution2", True),
        ("piqa", "solution12", "solution1", False), ("winogrande", "option1", "option2", False), ("winogrande", "Option2.", "option2", True),
        ("qnli", "Entailment", "entailment", True), ("qnli", "\"not_entailment\".", "not_entailment", True),
        ("qnli", "not entailment", "not_entailment", False), ("rte", "entailment, because", "entailment", False),
        ("rte", "Answer: not_entailment\nmore", "not_entailment", True),
        ("bbh/date_understanding", "(C)", "(C)", True), ("bbh/date_understanding", "C", "(C)", True),
        ("bbh/date_understanding", "(C) 01/02/2019", "(C)", True), ("bbh/date_understanding", "(D)", "(C)", False),
        ("bbh/sports_understanding", "yes", "yes", True), ("bbh/sports_understanding", "Yes.", "yes", True),
        ("bbh/boolean_expressions", "False", "True", False), ("bbh/formal_fallacies", "invalid", "valid", False),
        ("bbh/multistep_arithmetic_two", "-11520", "-11520", True), ("bbh/object_counting", "There are 8", "8", True),
        ("bbh/word_sorting", "a  b c", "a b c", True), ("bbh/word_sorting", "b a c", "a b c", False),
        ("bbh/navigate", "No\n\nquestion: x\nAnswer: Yes", "No", True),  # the few-shot stop sequence ends the answer
        ("bbh/ruin_names", "dearth, wind, & fire", "dearth, wind, & fire", True),
    ]
    for task, text, gold, want in cases:
        assert D.score(task, text, G(gold)) is want, (task, text, gold)
    for task, text in [("gsm8k", "no number"), ("arc", "I do not know"), ("piqa", "neither"), ("qnli", "maybe"),
                       ("bbh/snarks", "hmm"), ("bbh/navigate", "perhaps"), ("bbh/object_counting", "many")]:
        assert D.extract_answer(task, text) is None, (task, text)
    assert D.extract_answer("gsm8k", "#### 1,234") == "1234"
    assert D.extract_answer("arc", "4") == "D"


# ---------------------------------------------------------------- errors
def test_errors_name_file_line_field(tmp_path):
    (tmp_path / "glue" / "qnli").mkdir(parents=True)
    f = tmp_path / "glue" / "qnli" / "validation.jsonl"
    good = {"question": "q", "sentence": "s", "label": 0, "idx": 0}
    for bad_line, field in [(dict(good, label=-1), "label"), ({k: v for k, v in good.items() if k != "sentence"}, "sentence"),
                            (dict(good, question=""), "question")]:
        f.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + json.dumps(bad_line) + "\n")
        with pytest.raises(D.DataError, match=rf"validation.jsonl, line 3: field '{field}'"):
            D.load_task("qnli", "eval", data_dir=tmp_path)
    f.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(D.DataError, match="line 2: not valid JSON"): D.load_task("qnli", "eval", data_dir=tmp_path)
    (tmp_path / "gsm8k").mkdir(); (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "so 4"}\n')
    with pytest.raises(D.DataError, match="line 1: field 'answer'.*####"): D.load_task("gsm8k", "eval", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="known splits: train, validation"): D.load_task("qnli", "train", data_dir=tmp_path)
    with pytest.raises(KeyError, match="Known: train, validation, test"): load("openbookqa", "dev")
    with pytest.raises(KeyError, match="no split 'train'"): load("bbh/snarks", "train")
    with pytest.raises(KeyError, match="qnli.*navigate"): load("hellaswag")


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("ALIGNLORA_DATA", raising=False)
    assert D.data_dir() is None
    assert D.data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("ALIGNLORA_DATA", str(tmp_path))
    assert D.data_dir() == tmp_path
    assert D.data_dir(DATA) == DATA


# ---------------------------------------------------------------- leakage
def test_no_leakage_any_task_or_mix():
    trains = {n: load(n, "train") for n in NON_BBH}
    evals = {n: load(n, "eval") for n in NON_BBH}
    for n in NON_BBH: D.assert_no_leakage(trains[n], evals[n])
    for mix in (D.PAPER_TASKS, D.EIGHT_TASKS):  # across tasks too (e.g. ARC-Easy train vs ARC-Challenge test)
        D.assert_no_leakage([e for n in mix for e in trains[n]], [e for n in mix for e in evals[n]])
    # without the dedupe, the upstream duplicates are there and the check catches them
    for n, k in DROPPED.items():
        with pytest.raises(AssertionError, match=f"^{k} train examples"):
            D.assert_no_leakage(load(n, "train", dedupe=False), evals[n])


def test_bbh_shots_from_lm_eval_not_in_test():
    for n in D.BBH_TASKS:
        sub = n.split("/")[1]
        shots, src = D.bbh_shots(sub)
        assert src == "lm_eval"
        assert len(shots) == 3
        test_inputs = {D._norm(e["raw"]["input"]) for e in load(n, "eval")}
        assert not any(D._norm(s["input"]) in test_inputs for s in shots), n
        e = load(n, "eval", n=1)[0]
        assert e["prompt"].startswith(D.BBH_PREFIX + "\n\nquestion: ")
        assert e["prompt"].count("\nAnswer: ") == 4
        assert "Q:" not in e["prompt"].replace(e["raw"]["input"], "")
        assert e["prompt"].endswith(f"question: {e['raw']['input']}\nAnswer: ")


# ---------------------------------------------------------------- tokenisation
def test_labels_mask_exactly_prompt_and_padding(tok):
    exs = [e for n in D.EIGHT_TASKS + ["bbh/navigate"] for e in load(n, "eval" if n.startswith("bbh") else "train", n=6, seed=1)]
    feats = D.encode_many(exs, tok)
    batch = D.collate(feats, tok.pad_token_id)
    for i, (e, f) in enumerate(zip(exs, feats)):
        n_prompt = len(tok(e["prompt"])["input_ids"])
        L = len(f["input_ids"])
        lab, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        assert (lab[:n_prompt] == -100).all()
        assert (lab[n_prompt:L] != -100).all()
        assert (lab[L:] == -100).all()
        assert (mask[:L] == 1).all()
        assert (mask[L:] == 0).all()
        assert (ids[L:] == tok.pad_token_id).all()
        assert tok.decode(ids[lab != -100].tolist()) == e["target"] + tok.eos_token
        assert ids[:n_prompt].tolist() == tok(e["prompt"])["input_ids"]  # exactly what generation sees
        assert lab[L - 1].item() == tok.eos_token_id
    assert batch["input_ids"].shape[1] == max(len(f["input_ids"]) for f in feats)  # dynamic padding


def test_truncation_keeps_target(tok):
    e = load("gsm8k", n=1)[0]
    n_t = len(tok(e["target"], add_special_tokens=False)["input_ids"])
    for L in (n_t + 1, n_t + 10, 2000):
        f = D.encode(e, tok, max_length=L)
        n_p = len(tok(e["prompt"])["input_ids"])
        assert len(f["input_ids"]) == min(L, n_p + n_t + 1)
        sup = [i for i, l in zip(f["input_ids"], f["labels"]) if l != -100]
        assert tok.decode(sup) == e["target"] + tok.eos_token
        kept = f["input_ids"][:len(f["input_ids"]) - len(sup)]
        assert kept == tok(e["prompt"])["input_ids"][n_p - len(kept):]  # the prompt's right end
    with pytest.raises(ValueError, match="max_length"): D.encode(e, tok, max_length=n_t)


def test_truncation_keeps_bos():
    "A tokenizer that adds BOS (llama-style): left truncation keeps BOS in front."
    class Tok:
        eos_token_id, bos = 2, 1
        def __call__(self, x, add_special_tokens=True):
            one = lambda s: ([self.bos] if add_special_tokens else []) + [10 + ord(c) for c in s]
            return {"input_ids": [one(s) for s in x] if isinstance(x, list) else one(x)}
    f = D.encode({"prompt": "abcdef", "target": "xy"}, Tok(), max_length=6)
    assert f["input_ids"] == [1, 10 + ord("e"), 10 + ord("f"), 10 + ord("x"), 10 + ord("y"), 2]
    assert f["labels"] == [-100, -100, -100, 10 + ord("x"), 10 + ord("y"), 2]


# ---------------------------------------------------------------- balanced multi-task batches
def task_of(i, sizes):
    return int(np.searchsorted(np.cumsum(sizes), i, side="right"))


def test_sampler_balanced_many_steps_and_resume():
    sizes, k = [5, 1000, 37, 240, 3], 3
    s = D.BalancedSampler(sizes, k, seed=7, num_steps=600)
    batches = list(s)
    assert len(batches) == 600
    for b in batches:
        assert Counter(task_of(i, sizes) for i in b) == {t: k for t in range(5)}
        assert all(0 <= i < sum(sizes) for i in b)
    # resume from any step (new object, or set_step) gives the same batches
    for start in (0, 1, 123, 599):
        assert list(D.BalancedSampler(sizes, k, seed=7, start_step=start, num_steps=600)) == batches[start:]
    s2 = D.BalancedSampler(sizes, k, seed=7, num_steps=600); s2.set_step(300)
    assert len(s2) == 300
    assert next(iter(s2)) == batches[300]
    assert list(D.BalancedSampler(sizes, k, seed=8, num_steps=600)) != batches
    # each task is a stream of full passes: every row once per pass, a fresh shuffle per pass (cycling small tasks)
    stream = [[i for b in batches for i in b if task_of(i, sizes) == t] for t in range(5)]
    for t, n in enumerate(sizes):
        passes = [stream[t][j:j + n] for j in range(0, len(stream[t]) - n + 1, n)]
        assert all(sorted(p) == list(range(sum(sizes[:t]), sum(sizes[:t]) + n)) for p in passes)
        if n >= 37: assert len({tuple(p) for p in passes}) == len(passes)  # reshuffled each pass
        assert len(passes) < 2 or len({tuple(p) for p in passes}) > 1


def test_sampler_ddp_disjoint_balanced():
    sizes, k, W = [40, 100, 64], 2, 4
    ranks = [D.BalancedSampler(sizes, k, seed=1, rank=r, world_size=W) for r in range(W)]
    assert len({len(r) for r in ranks}) == 1
    assert len(ranks[0]) == int(np.ceil(sum(sizes) / (3 * k * W)))
    for step in range(50):
        bs = [r.batch(step) for r in ranks]
        assert all(Counter(task_of(i, sizes) for i in b) == {0: k, 1: k, 2: k} for b in bs)
        flat = [i for b in bs for i in b]
        assert len(flat) == len(set(flat))  # disjoint across ranks
    # the ranks together read each task's stream like one process with k*W per task
    one = D.BalancedSampler(sizes, [k * W] * 3, seed=1)
    for step in range(10):
        assert sorted(i for r in ranks for i in r.batch(step)) == sorted(one.batch(step))


def test_sampler_ratios_and_errors():
    s = D.BalancedSampler([10, 10, 10], [1, 2, 3], batch_size=6)
    assert all(Counter(task_of(i, [10] * 3) for i in s.batch(j)) == {0: 1, 1: 2, 2: 3} for j in range(20))
    with pytest.raises(ValueError, match="Batch size 12 != k × tasks"): D.BalancedSampler([10] * 5, 2, batch_size=12)
    with pytest.raises(ValueError, match="at least one row"): D.BalancedSampler([10, 0], 2)
    with pytest.raises(ValueError, match="rank"): D.BalancedSampler([10], 2, rank=2, world_size=2)


def test_multitask_loader(tok):
    data = D.MultiTaskData.from_tasks(D.PAPER_TASKS, tok, n={"qnli": 30, "piqa": 7, "winogrande": 30, "arc": 30, "gsm8k": 12},
                                      data_dir=DATA, max_length=256)
    assert data.task_sizes == [30, 7, 30, 30, 12]
    assert data.task_names == D.PAPER_TASKS
    dl = data.loader(2, tok.pad_token_id, seed=0, batch_size=10, num_steps=40)
    n = 0
    for b in dl:
        n += 1
        assert set(b) == {"input_ids", "attention_mask", "labels", "task_ids"}
        assert b["task_ids"].dtype == torch.long
        assert Counter(b["task_ids"].tolist()) == {t: 2 for t in range(5)}
        assert ((b["labels"] == -100) | (b["attention_mask"] == 1)).all()
        assert b["input_ids"].shape[1] == int(b["attention_mask"].sum(1).max()) <= 256
    assert n == 40
    with pytest.raises(ValueError, match="Batch size 8"): data.loader(2, tok.pad_token_id, batch_size=8)
