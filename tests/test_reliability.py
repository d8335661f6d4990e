"""The run cache under faults and misuse, on the tiny model: two processes on one key, kill -9 during a checkpoint
write, a full disk, tampered results, changed data, a diverging run, merging into a tied weight, and a table of
bad inputs whose errors must name the argument."""
import dataclasses, errno, json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import pytest
import torch

import alignlora.adapters as A
import alignlora.experiments as X
from alignlora.experiments import CALLS, Claim, InProgressElsewhere, collect, make_eval, make_spec, run, run_status
from alignlora.errors import DiskFull

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["qnli", "piqa"]
DATA = Path(os.environ.get("ALIGNLORA_DATA") or ROOT.parent / "shared" / "data")
pytestmark = pytest.mark.skipif(not (DATA / "piqa").exists(), reason=f"offline data folder {DATA} not found")


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLORA_RUNS", str(tmp_path / "runs"))
    for k in CALLS: CALLS[k] = 0
    return tmp_path / "runs"


def _python(code: str, *args, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _log_steps(d: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (d / "train" / "log.jsonl").read_text().splitlines()]


# ---- concurrency -------------------------------------------------------------------------------------------

def test_two_processes_on_one_key_train_and_evaluate_once(runs):
    code = """
        import json, sys
        import alignlora.experiments as X
        s = X.make_spec("smoke", "lora", ["qnli", "piqa"])
        X.run(s, [X.make_eval("smoke", ["qnli"])], sys.argv[1])
        print(json.dumps(X.CALLS))
    """
    procs = [_python(code, runs) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    calls = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(c["train"] for c in calls) == 1 and sum(c["evaluate"] for c in calls) == 1, calls
    spec = make_spec("smoke", "lora", TASKS)
    assert _log_steps(runs / spec.key) == [1, 2], "one training, unique steps"
    assert run_status(spec) == "trained"
    assert not list(runs.glob("*.lock"))
    assert not list(runs.glob("*/eval/*.lock"))
    assert any("in progress elsewhere" in err for _, err in outs) or any("in progress elsewhere" in o for o, _ in outs)


def test_busy_run_is_reported_and_skipped(runs):
    spec = make_spec("smoke", "lora", TASKS)
    with Claim(runs / f"{spec.key}.lock", "held by the test"):
        with pytest.raises(InProgressElsewhere, match="in progress elsewhere"):
            run(spec, wait_s=0.3)
        assert X.run_grid([spec], wait_s=0.3, progress=False).empty   # moves on
    assert CALLS["train"] == 0 and not (runs / spec.key).exists(), "never works in the holder's folder"


# ---- crashes and full disks --------------------------------------------------------------------------------

KW = dict(n_train=8, k=2, max_length=96, max_steps=6, save_steps=2, progress=False)


def test_kill_9_during_checkpoint_write_resumes_from_the_previous_good_one(tmp_path):
    code = """
        import io, os, signal, sys, torch
        from alignlora.train import train
        real = torch.save
        def dying_save(obj, f, *a, **k):   # writes half of one file of checkpoint-4, then kill -9
            if "checkpoint-4" in str(f):
                buf = io.BytesIO(); real(obj, buf, *a, **k); data = buf.getvalue()
                with open(f, "wb") as fh: fh.write(data[: len(data) // 2]); fh.flush(); os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *a, **k)
        torch.save = dying_save
        train("tiny", "lora", ["qnli", "piqa"], output_dir=sys.argv[1], n_train=8, k=2, max_length=96,
              max_steps=6, save_steps=2, progress=False)
    """
    p = _python(code, tmp_path / "killed"); _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    ck = tmp_path / "killed.partial" / "checkpoints"
    assert (ck / "checkpoint-2").is_dir() and (ck / "checkpoint-4").is_dir(), "the kill hit the checkpoint-4 write"
    from alignlora.train import train
    from alignlora.adapters import adapter_state_dict
    with pytest.warns(UserWarning, match="half-written"):
        resumed = train("tiny", "lora", TASKS, output_dir=tmp_path / "killed", **KW)
    assert resumed.metrics["resumed_from"].endswith("checkpoint-2")
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    full = train("tiny", "lora", TASKS, output_dir=tmp_path / "full", **KW)
    a, b = adapter_state_dict(resumed.model), adapter_state_dict(full.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), "resume ends where the uninterrupted run ends"


def test_full_disk_is_reported_and_finished_work_is_kept(runs, monkeypatch):
    done = make_spec("smoke", "lora", TASKS); ev = make_eval("smoke", ["qnli"])
    first = run(done, [ev])
    real = A.save_file
    def full_disk(*a, **k): raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(A, "save_file", full_disk)
    other = make_spec("smoke", "lora", TASKS, seed=1)
    with pytest.raises(DiskFull, match="disk full while writing under .*" + other.key) as e:
        run(other)
    assert e.value.errno == errno.ENOSPC
    assert "free space" in str(e.value)
    assert run_status(other) == "partial" and not list(runs.glob("*.lock")), "claim released"
    assert run_status(done) == "trained" and run(done, [ev])["evals"] == first["evals"], "finished work untouched"
    monkeypatch.setattr(A, "save_file", real)
    run(other); assert run_status(other) == "trained"


def test_non_finite_loss_stops_training_and_nothing_is_marked_trained(runs, tmp_path):
    from alignlora.train import train
    with pytest.raises(FloatingPointError, match=r"diverged at step \d+.*learning rate is likely too high"):
        train("tiny", "lora", TASKS, output_dir=tmp_path / "nan", learning_rate=1e30, **KW)
    assert not (tmp_path / "nan").exists()
    spec = dataclasses.replace(make_spec("smoke", "lora", TASKS), lr=1e30, max_steps=4)   # step 2 of 2 ends at 1e30, still finite
    with pytest.raises(FloatingPointError, match="step"):
        run(spec)
    assert run_status(spec) == "partial"
    assert not (runs / spec.key / "TRAINED").exists()


# ---- tampering, changed data, collect, read-only -----------------------------------------------------------

def test_tampered_evaluation_and_training_log_are_redone(runs):
    spec, ev = make_spec("smoke", "lora", TASKS), make_eval("smoke", ["qnli"])
    good = run(spec, [ev])["evals"][ev.key]
    f = runs / spec.key / "eval" / f"{ev.key}.json"
    rec = json.loads(f.read_text()); rec["results"]["qnli"]["acc"] = 1.0; f.write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match="corrupt"):
        assert collect().empty, "collect does not read a tampered evaluation"
    served = run(spec, [ev])["evals"][ev.key]
    assert CALLS == {"train": 1, "evaluate": 2}
    assert served["results"] == good["results"]
    assert list(f.parent.glob(f"{f.name}.corrupt-*")), "the tampered file is kept aside"
    log = runs / spec.key / "train" / "log.jsonl"
    log.write_text(log.read_text().replace('"step": 2', '"step": 3'))
    assert run_status(spec) == "corrupt"
    run(spec, [ev]); assert CALLS["train"] == 2 and run_status(spec) == "trained"
    assert _log_steps(runs / spec.key) == [1, 2]


def test_changed_data_folder_redoes_training_and_evaluation(runs, tmp_path):
    data = tmp_path / "data"
    for sub in ("glue/qnli", "piqa"): shutil.copytree(DATA / sub, data / sub)
    spec, ev = make_spec("smoke", "lora", TASKS), make_eval("smoke", ["piqa"])
    run(spec, [ev], data_dir=data); run(spec, [ev], data_dir=data)
    assert CALLS == {"train": 1, "evaluate": 1}
    val = data / "piqa" / "validation.jsonl"
    val.write_text("".join(reversed(val.read_text().splitlines(keepends=True))))   # other rows at the same size
    out = run(spec, [ev], data_dir=data)
    assert CALLS == {"train": 2, "evaluate": 2}, "the data is part of what a result means"
    assert list(runs.glob(f"{spec.key}.stale-*"))
    from alignlora.data import load_task
    ids = {e["id"] for e in load_task("piqa", "eval", n=ev.limit, data_dir=data)}
    assert {i for i, _ in out["evals"][ev.key]["results"]["piqa"]["per_example"]} == ids


def test_collect_skips_an_unreadable_spec_and_a_read_only_cache_serves(runs, monkeypatch):
    ev = make_eval("smoke", ["qnli"])
    a, b = make_spec("smoke", "lora", TASKS), make_spec("smoke", "m-lora", TASKS)
    run(a, [ev]); run(b, [ev])
    (runs / b.key / "spec.json").write_text("{half")
    with pytest.warns(UserWarning, match=f"skipped .*{b.key}"):
        df = collect()
    assert set(df.method) == {"lora"}
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in runs.rglob("*")}
    def no_writes(*a, **k): raise PermissionError(errno.EACCES, "read-only cache")
    monkeypatch.setattr(X, "atomic_write", no_writes); monkeypatch.setattr(Claim, "acquire", no_writes)
    assert run(a, [ev])["evals"][ev.key]["results"]["qnli"]["n"] == 4
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in runs.rglob("*")} == before, "serving writes nothing"


# ---- tied weights -----------------------------------------------------------------------------------------

def test_merge_into_a_tied_weight_is_refused():
    from alignlora.models import load_model
    m, _ = load_model("tiny")
    assert m.lm_head.weight is m.model.embed_tokens.weight, "the tiny model ties lm_head to the embeddings"
    emb = m.model.embed_tokens.weight.detach().clone()
    A.add_adapters(m, "lora", target_modules=["lm_head"])
    torch.nn.init.normal_(A.adapter_layers(m)[0].lora_B, std=0.1)
    with pytest.raises(ValueError, match="lm_head.weight is tied to model.embed_tokens.weight"):
        A.merge_adapters(m)
    assert torch.equal(m.model.embed_tokens.weight, emb)
    assert not A.adapter_layers(m)[0].merged


# ---- bad inputs -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from alignlora.models import load_model
    return load_model("tiny")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny):
    "Damaged adapter folders, a PEFT folder, a non-UTF-8 data folder, an empty evaluation split, a foreign output dir."
    root = tmp_path_factory.mktemp("bad")
    from alignlora.models import load_model
    m, _ = load_model("tiny"); A.add_adapters(m, "lora")
    good = A.save_adapters(m, root / "good")
    for name, damage in [("truncated", lambda d: (d / A.ADAPTER_FILE).write_bytes((d / A.ADAPTER_FILE).read_bytes()[:100])),
                         ("badjson", lambda d: (d / A.CONFIG_FILE).write_text("{oops"))]:
        shutil.copytree(good, root / name); damage(root / name)
    A.export_peft(m, root / "peft")
    from transformers import AutoModelForCausalLM
    from alignlora.models import model_config
    c = model_config("tiny"); c.intermediate_size *= 2   # same adapter config, other MLP shapes
    wide = AutoModelForCausalLM.from_config(c)
    for task, split, body in [("piqa", "train", b'{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": "\xff"}\n'),
                              ("piqa", "validation", b"")]:
        f = root / ("utf8" if split == "train" else "empty") / task / f"{split}.jsonl"
        f.parent.mkdir(parents=True, exist_ok=True); f.write_bytes(body)
    (root / "mine").mkdir(); (root / "mine" / "notes.txt").write_text("keep me")
    return dict(root=root, wide=wide)


def _bad_cases():
    from alignlora.adapters import AdapterConfig, add_adapters, load_adapters
    from alignlora.data import load_task
    from alignlora.eval import evaluate
    from alignlora.models import load_model
    from alignlora.train import train
    from alignlora.experiments import EvalSpec
    spec = lambda **kw: dataclasses.replace(make_spec("smoke", "lora", TASKS), **kw)
    ms = lambda *a, **kw: make_spec("smoke", *a, **kw)
    tr = lambda **kw: train("tiny", "lora", kw.pop("tasks", TASKS), **{**dict(n_train=4, max_steps=1, progress=False), **kw})
    ev = lambda tiny, **kw: evaluate(*tiny, kw.pop("tasks", ["piqa"]), **{**dict(limit=2), **kw})
    F = lambda f, name: f["root"] / name
    return [  # (id, call(tiny, folders), words the message must contain: the argument, and a suggestion where one fits)
        ("tasks-empty", lambda t, f: ms("lora", []), ["tasks"]),
        ("tasks-string-typo", lambda t, f: ms("lora", "qnlii"), ["tasks", "Did you mean 'qnli'"]),
        ("tasks-typo", lambda t, f: ms("lora", ["qnli", "piqaa"]), ["tasks", "'piqa'"]),
        ("tasks-twice", lambda t, f: ms("lora", ["qnli", "qnli"]), ["tasks", "more than once"]),
        ("tasks-eval-only", lambda t, f: ms("lora", ["bbh/navigate"]), ["tasks", "training task"]),
        ("method-typo", lambda t, f: ms("lorra", TASKS), ["method", "Did you mean 'lora'"]),
        ("profile-typo", lambda t, f: make_spec("smok", "lora", TASKS), ["profile", "'smoke'"]),
        ("seed-string", lambda t, f: ms("lora", TASKS, seed="0"), ["seed"]),
        ("seed-negative", lambda t, f: ms("lora", TASKS, seed=-1), ["seed"]),
        ("target-typo", lambda t, f: ms("lora", TASKS, target_modules="q_prj"), ["target_modules", "'q_proj'"]),
        ("target-empty", lambda t, f: ms("lora", TASKS, target_modules=[]), ["target_modules"]),
        ("base-overrides", lambda t, f: ms("base", TASKS, r=4), ["overrides", "base"]),
        ("override-unknown", lambda t, f: ms("lora", TASKS, rr=4), ["rr"]),
        ("alpha-string", lambda t, f: ms("lora", TASKS, alpha="32"), ["alpha"]),
        ("r-zero", lambda t, f: ms("lora", TASKS, r=0), ["r must"]),
        ("r-float", lambda t, f: ms("lora", TASKS, r=4.5), ["r must"]),
        ("dropout-high", lambda t, f: ms("lora", TASKS, dropout=1.5), ["dropout"]),
        ("heads-zero", lambda t, f: ms("m-lora", TASKS, heads=0), ["heads"]),
        ("lambda-negative", lambda t, f: ms("align-lora-kl", TASKS, align_lambda=-1.0), ["align_lambda"]),
        ("align-one-task", lambda t, f: ms("align-lora-kl", ["qnli"]), ["tasks", "at least 2"]),
        ("lr-zero", lambda t, f: spec(lr=0), ["lr"]),
        ("lr-negative", lambda t, f: spec(lr=-1e-3), ["lr"]),
        ("lr-string", lambda t, f: spec(lr="1e-3"), ["lr"]),
        ("max-steps-zero", lambda t, f: spec(max_steps=0), ["max_steps", "None trains one epoch"]),
        ("k-zero", lambda t, f: spec(k=0), ["k must"]),
        ("grad-accum-zero", lambda t, f: spec(grad_accum=0), ["grad_accum"]),
        ("n-train-negative", lambda t, f: spec(n_train=-1), ["n_train"]),
        ("dtype-alias", lambda t, f: spec(dtype="bf16"), ["dtype", "'bfloat16'"]),
        ("model-typo", lambda t, f: spec(model="tinny"), ["model", "Did you mean 'tiny'"]),
        ("max-length-zero", lambda t, f: spec(max_length=0), ["max_length"]),
        ("eval-tasks-empty", lambda t, f: EvalSpec(tasks=()), ["tasks"]),
        ("eval-task-typo", lambda t, f: make_eval("smoke", ["piqaa"]), ["task", "'piqa'"]),
        ("eval-protocol", lambda t, f: make_eval("smoke", ["piqa"], protocol="generation"), ["protocol", "'generate'"]),
        ("eval-limit-negative", lambda t, f: EvalSpec(tasks=("piqa",), limit=-1), ["limit"]),
        ("eval-limit-zero", lambda t, f: EvalSpec(tasks=("piqa",), limit=0), ["limit"]),
        ("eval-batch-zero", lambda t, f: EvalSpec(tasks=("piqa",), batch_size=0), ["batch_size"]),
        ("eval-cap-zero", lambda t, f: EvalSpec(tasks=("piqa",), max_new_tokens=0), ["max_new_tokens"]),
        ("eval-limits-foreign", lambda t, f: EvalSpec(tasks=("piqa",), limits=(("gsm8k", 2),)), ["limits", "gsm8k"]),
        ("run-evals-type", lambda t, f: run(make_spec("smoke", "base", TASKS), ["piqa"]), ["evals"]),
        ("load-n-negative", lambda t, f: load_task("qnli", n=-1), ["n must"]),
        ("load-task-typo", lambda t, f: load_task("qnlii"), ["task", "Did you mean 'qnli'"]),
        ("data-env-empty", lambda t, f: (os.environ.__setitem__("ALIGNLORA_DATA", ""), load_task("qnli")), ["ALIGNLORA_DATA"]),
        ("data-not-utf8", lambda t, f: load_task("piqa", data_dir=F(f, "utf8"), dedupe=False), ["train.jsonl, line 2", "UTF-8"]),
        ("train-lr-zero", lambda t, f: tr(learning_rate=0.0), ["learning_rate"]),
        ("train-max-steps-zero", lambda t, f: tr(max_steps=0), ["max_steps"]),
        ("train-grad-accum-zero", lambda t, f: tr(gradient_accumulation_steps=0), ["gradient_accumulation_steps"]),
        ("train-dtype-string", lambda t, f: tr(dtype="bf16"), ["dtype", "'bf16'"]),
        ("train-tasks-empty", lambda t, f: tr(tasks=[]), ["tasks"]),
        ("train-k-zero", lambda t, f: tr(k=0), ["k must"]),
        ("train-n-negative", lambda t, f: tr(n_train=-1), ["n_train"]),
        ("train-foreign-output", lambda t, f: tr(output_dir=F(f, "mine")), ["output_dir", "notes.txt"]),
        ("model-load-typo", lambda t, f: load_model("tinny"), ["model", "Did you mean 'tiny'"]),
        ("model-load-dtype", lambda t, f: load_model("tiny", dtype="bf16"), ["dtype"]),
        ("config-alpha-string", lambda t, f: AdapterConfig(alpha="32"), ["alpha"]),
        ("add-target-typo", lambda t, f: add_adapters(load_model("tiny")[0], "lora", target_modules="q_prj"), ["target_modules"]),
        ("adapters-truncated", lambda t, f: load_adapters(load_model("tiny")[0], F(f, "truncated")), [A.ADAPTER_FILE, "truncated"]),
        ("adapters-bad-json", lambda t, f: load_adapters(load_model("tiny")[0], F(f, "badjson")), [A.CONFIG_FILE, "not valid JSON"]),
        ("adapters-peft", lambda t, f: load_adapters(load_model("tiny")[0], F(f, "peft")), ["import_peft"]),
        ("adapters-shape", lambda t, f: load_adapters(f["wide"], F(f, "good")), ["mlp", "shape"]),
        ("eval-limit-call", lambda t, f: ev(t, limit=-1), ["limit"]),
        ("eval-protocol-call", lambda t, f: ev(t, protocol="gen"), ["protocol"]),
        ("eval-empty-tasks-call", lambda t, f: ev(t, tasks=[]), ["tasks"]),
        ("eval-empty-split", lambda t, f: ev(t, data_dir=F(f, "empty")), ["no evaluation rows", "piqa"]),
    ]


CASES = _bad_cases()
assert len(CASES) >= 40


@pytest.mark.parametrize("call,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_an_error_naming_the_argument(call, words, tiny, folders, runs, monkeypatch):
    monkeypatch.setenv("ALIGNLORA_DATA", str(DATA))   # one case empties it
    with pytest.raises((ValueError, TypeError, KeyError, FileExistsError, FileNotFoundError)) as e:
        call(tiny, folders)
    assert all(w in str(e.value) for w in words), f"{words} not all in: {e.value}"
    assert CALLS["train"] == 0 and not (runs.exists() and any(runs.iterdir())), "rejected before any work"
