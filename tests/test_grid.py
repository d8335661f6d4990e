"""The scale-out path without a cluster: `make grid` on a Ray cluster of this machine (127.0.0.1) and on submitit's
local executor fills a fresh run cache with the smoke grid of every paper notebook; `make reproduce` then trains nothing
and writes the local executor's tables. A worker killed mid-run is resumed by another; one run on two gloo ranks."""
import json, os, signal, subprocess, sys, threading, time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from alignlora.executors import fill, jobs_of
from alignlora.experiments import make_spec, make_eval, reproduce, read_table
from alignlora.grid import grid_plan, plan_jobs
from alignlora.train import _checkpoint_problem

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["qnli", "piqa", "winogrande", "arc", "gsm8k"]
TIMED = {"costs", "walltimes", "table1_power", "scale_check"}   # tables of wall times: they differ between any two executions


def make_grid(*args, env=None, timeout=1200):
    "`make grid ...` in the repository; (stdout, stderr)."
    p = subprocess.run(["make", "-s", "grid", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout, p.stderr


def planned():
    "The smoke grid's runs: (jobs, keys of the runs that train)."
    jobs = plan_jobs(grid_plan("smoke"))
    return jobs, {j.spec.key for j in jobs if j.spec.method != "base"}


def tables(res: Path) -> dict:
    "{table: its CSV without provenance} of a results folder, timing tables left out."
    return {f.stem: "\n".join(l for l in f.read_text().splitlines() if not l.startswith("#"))
            for f in sorted(res.glob("*.csv")) if f.stem not in TIMED}


def adapter_bits(runs: Path) -> dict:
    "{run: sha256 of its trained adapter files}: equal bits mean every table computed from the weights is equal too."
    import hashlib
    return {d.name: hashlib.sha256(b"".join(f.read_bytes() for f in sorted((d / "train" / "adapters").rglob("*")) if f.is_file())).hexdigest()
            for d in runs.iterdir() if (d / "TRAINED").exists()}


def eval_records(runs: Path) -> dict:
    "{(run, evaluation): per-task per-row correctness} of a run cache: what every table is computed from."
    out = {}
    for f in runs.glob("*/eval/*.json"):
        rec = json.loads(f.read_text())
        out[f.parent.parent.name, f.stem] = {t: r.get("per_example") for t, r in rec["results"].items() if isinstance(r, dict)}
    return out


def test_make_grid_on_ray_then_reproduce_trains_nothing(smoke, tmp_path):
    res_local, runs_local = smoke
    runs = tmp_path / "runs"
    # each task computes with as many threads as the local run did: the same kernels, so the same bits
    _, err = make_grid("PROFILE=smoke", "EXECUTOR=ray", "WORKERS=2", f"CPUS={torch.get_num_threads()}", f"RUNS_DIR={runs}")
    jobs, trained = planned()
    assert {p.parent.name for p in runs.glob("*/TRAINED")} == trained          # every run of every table
    done = [l for l in err.splitlines() if l.startswith("[grid] ") and ": computed in " in l]
    assert len(done) == len(jobs), err[-3000:]                                  # each job computed exactly once
    for k in trained:                                                           # ... and trained once: one log line a step
        steps = [json.loads(l)["step"] for l in (runs / k / "train" / "log.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)), k
    assert eval_records(runs) == eval_records(runs_local)                      # the same predictions, row for row
    assert adapter_bits(runs) == adapter_bits(runs_local)                      # and the same weights, bit for bit
    res = tmp_path / "results" / "smoke"
    wt = reproduce("smoke", results_dir=res, runs_dir_=runs, log=lambda *a: None)
    assert int(wt.new_runs.sum()) == 0 and int(wt.new_evals.sum()) == 0         # rendering trains nothing
    assert tables(res) == tables(res_local)                                     # the local executor's tables, digit for digit


def test_make_grid_on_submitit_local_executor_fills_the_same_cache(smoke, tmp_path):
    _, runs_local = smoke
    runs = tmp_path / "runs"
    _, err = make_grid("PROFILE=smoke", "EXECUTOR=slurm", "WORKERS=2", f"RUNS_DIR={runs}",
                       env={"ALIGNLORA_SLURM_CLUSTER": "local"})
    jobs, trained = planned()
    assert {p.parent.name for p in runs.glob("*/TRAINED")} == trained
    assert len(list((runs / ".submitit").glob("*/*_result.pkl"))) == len(jobs)   # one submitit job per run
    assert eval_records(runs) == eval_records(runs_local)
    assert adapter_bits(runs) == adapter_bits(runs_local)                      # the local run's weights, bit for bit
    again, _ = make_grid("PROFILE=smoke", "EXECUTOR=slurm", f"RUNS_DIR={runs}", env={"ALIGNLORA_SLURM_CLUSTER": "local"})
    assert len(list((runs / ".submitit").glob("*/*_result.pkl"))) == len(jobs)   # a full cache submits nothing


def test_dry_run_prints_the_plan_and_writes_its_tables(smoke, tmp_path):
    _, runs_local = smoke
    jobs, _ = planned()
    out, _ = make_grid("PROFILE=smoke", "DRY_RUN=1", f"RUNS_DIR={tmp_path / 'empty'}", f"OUT={tmp_path / 'plan'}")
    assert f"DRY RUN: profile smoke, executor local: {len(jobs)} runs, 0 cached, {len(jobs)} would be submitted" in out
    plan, prov = read_table(tmp_path / "plan" / "grid_plan.csv")
    assert len(plan) == len(jobs) and prov["profile"] == "smoke"
    assert set(plan.tokens_per_s_source.dropna()) == {"none"}                  # no trained run, no rate given: no hours
    out, _ = make_grid("PROFILE=smoke", "DRY_RUN=1", f"RUNS_DIR={runs_local}", f"OUT={tmp_path / 'full'}")
    assert f"{len(jobs)} cached, 0 would be submitted" in out
    plan, _ = read_table(tmp_path / "full" / "grid_plan.csv")
    trained = plan[plan.train_tokens.notna()]
    assert set(trained.tokens_per_s_source) == {"cache"}                       # rates measured by the cached runs
    hours = trained.train_tokens / trained.tokens_per_s / 3600
    assert ((trained.device_hours - hours).abs() <= 5e-4).all()                  # hours = tokens / measured rate (3 decimals)
    assert (tmp_path / "full" / "grid_memory.md").exists() and (tmp_path / "full" / "grid_tables.md").exists()


def _lock_pid(lock: Path):
    try: return json.loads(lock.read_text()).get("pid")
    except (OSError, ValueError): return None


def test_a_worker_killed_mid_run_is_resumed_by_another(tmp_path):
    "kill -9 of the Ray worker that holds a run, after its first checkpoint: Ray retries the task elsewhere, and the run resumes."
    spec = replace(make_spec("smoke", "lora", ["qnli", "piqa"]), max_steps=60)
    runs = tmp_path / "runs"; d = runs / spec.key
    code = ("import sys, pickle; from alignlora.executors import fill, jobs_of; spec = pickle.loads(bytes.fromhex(sys.argv[1])); "
            "out = fill(jobs_of([(spec, [])]), 'ray', sys.argv[2], workers=2); print(out); sys.exit(1 if out.failed else 0)")
    import pickle
    p = subprocess.Popen([sys.executable, "-c", code, pickle.dumps(spec).hex(), str(runs)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed, t0 = None, time.time()
    while killed is None and p.poll() is None and time.time() - t0 < 300:
        done = [c for c in (d / "train.partial" / "checkpoints").glob("checkpoint-*") if _checkpoint_problem(c) is None]
        if done and not (d / "TRAINED").exists():   # a complete checkpoint to resume from, and training still going
            pid = _lock_pid(runs / f"{spec.key}.lock")
            if pid and pid != p.pid: os.kill(pid, signal.SIGKILL); killed = pid
        time.sleep(0.02)
    out, err = p.communicate(timeout=600)
    assert killed, f"the run finished before a checkpoint was seen: {err[-2000:]}"
    assert p.returncode == 0, err[-3000:]
    assert "1 computed, 0 failed" in out
    metrics = json.loads((d / "train" / "metrics.json").read_text())
    assert metrics["resumed_from"] and "checkpoint-" in metrics["resumed_from"]    # the retry resumed, not restarted
    steps = [json.loads(l)["step"] for l in (d / "train" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))                                            # every step logged once


def test_one_run_on_two_ranks(tmp_path):
    "ranks=2: the job runs torchrun (two gloo processes on CPU); both train, rank 0 alone writes and evaluates."
    spec, ll = make_spec("smoke", "lora", ["qnli", "piqa"]), make_eval("smoke", ["piqa"], "loglik")
    out = fill(jobs_of([(spec, [ll])]), "local", tmp_path / "runs", ranks=2, say=lambda *a: None)
    assert out.computed == [spec.label] and not out.failed
    d = tmp_path / "runs" / spec.key
    assert json.loads((d / "train" / "metrics.json").read_text())["world_size"] == 2
    assert len(list((d / "eval").glob("*.done"))) == 1
    assert spec.key == make_spec("smoke", "lora", ["qnli", "piqa"]).key          # the world size is not in the key


def test_a_missing_engine_is_named_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` now raises ImportError
    spec = make_spec("smoke", "lora", ["qnli", "piqa"])
    with pytest.raises(ImportError, match=r"alignlora\[ray\]"):
        fill(jobs_of([(spec, [])]), "ray", tmp_path / "runs")
    assert not (tmp_path / "runs" / spec.key).exists()


def test_reproduce_refuses_an_unknown_executor_before_any_notebook(tmp_path):
    with pytest.raises(ValueError, match="executor='kubernetes'"):
        reproduce("smoke", results_dir=tmp_path / "r", runs_dir_=tmp_path / "runs", executor="kubernetes")
    assert not (tmp_path / "r").exists()


def test_a_paper_notebooks_grid_goes_to_the_executor_reproduce_names(tmp_path, monkeypatch):
    "`make reproduce EXECUTOR=...` reaches `ctx.grid`: its missing runs go through the engine (submitit's in-process one here)."
    from alignlora.experiments import EXECUTOR_ENV
    from alignlora.paper import paper_context
    monkeypatch.setenv(EXECUTOR_ENV, "slurm"); monkeypatch.setenv("ALIGNLORA_SLURM_CLUSTER", "debug")
    ctx = paper_context("smoke", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"))
    df = ctx.grid(["lora"], ["qnli", "piqa"], [ctx.eval(["piqa"], "loglik")])
    assert list(df.task) == ["piqa"] and df.acc.notna().all()
    assert len(list((tmp_path / "runs" / ".submitit").glob("*/*"))) > 0   # computed by a submitit job, then read
