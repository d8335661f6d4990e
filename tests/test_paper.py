"Every paper notebook, end to end with the smoke profile, into a temporary folder (never the committed results/)."
import os
from pathlib import Path

import pandas as pd
import pytest

from alignlora.data import PAPER_TASKS
from alignlora.experiments import reproduce, read_table

EXPECTED = {
    "param_budgets": ("csv", "md"), "param_budgets_vs_paper": ("csv", "md"),
    "table1": ("csv", "md"), "table1_paired": ("csv", "md"), "table1_training": ("csv", "md"), "table3": ("csv", "md"),
    "table4": ("csv", "md"), "table4_subtasks": ("csv", "md"), "table5": ("csv", "md"),
    "fig2_head_similarity": ("csv", "md", "png"), "fig3_lambda": ("csv", "md", "png"), "fig5_tsne": ("csv", "md", "png"),
    "costs": ("csv", "md"), "ablations": ("csv", "md"), "walltimes": ("csv", "md"),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    res, runs = root / "results" / "smoke", root / "runs"
    reproduce("smoke", results_dir=res, runs_dir_=runs, log=lambda *a: None)
    return res, runs


def test_smoke_reproduce_writes_every_artefact(smoke):
    res, _ = smoke
    missing = [f"{n}.{ext}" for n, exts in EXPECTED.items() for ext in exts if not (res / f"{n}.{ext}").exists()]
    assert not missing, f"missing artefacts: {missing}"
    assert len(list(res.glob("claims_*.csv"))) >= 8
    assert len(list((res / "notebooks").glob("*.ipynb"))) == len(list((Path(__file__).parents[1] / "nbs" / "paper").glob("*.ipynb")))
    index = (res.parent / "README.md").read_text()
    assert "Profile `smoke`" in index
    assert "table1" in index
    for n in EXPECTED:
        df, prov = read_table(res / f"{n}.csv")
        assert prov["profile"] == "smoke" and prov["git_commit"] and prov["hardware"], n
        assert len(df) > 0, n


def _body(path):
    return "\n".join(l for l in Path(path).read_text().splitlines() if not l.startswith("#"))


def _check_table1_against_cache(table1_csv, runs):
    "Recompute every method's Avg in a Table 1 CSV from the cached evaluations it was built from."
    from alignlora.experiments import collect
    t1, prov = read_table(table1_csv)
    df = collect(runs)
    five = PAPER_TASKS
    gen = df[(df.protocol == "generate") & (df.train_tasks == ",".join(five)) & df.task.isin(five)
             & (df.overrides.astype(str) == "{}") & (df.target == "gate_proj,up_proj,down_proj") & (df.model == prov["model"])]
    gen = gen[gen.eval_key.isin(gen.groupby("eval_key").task.nunique().loc[lambda s: s == 5].index)]
    checked = 0
    for r in t1.itertuples():
        if r.method == "base": continue
        sub = gen[gen.method == r.method]
        assert len(sub) == 5 * len(prov["seeds"]), r.method
        assert round(sub.groupby("seed").acc.mean().mean() * 100, 1) == pytest.approx(float(r.avg), abs=0.051), r.method
        checked += 1
    assert checked == 9


def test_smoke_table1_matches_the_run_cache(smoke):
    "The table's numbers come from the run cache: recompute every method's Avg from the cached evaluations."
    res, runs = smoke
    _check_table1_against_cache(res / "table1.csv", runs)


def test_committed_cpu_table1_matches_the_local_run_cache():
    "The committed results/cpu/table1.csv against the run cache that produced it, where that cache is present."
    root = Path(__file__).parents[1]
    t1 = root / "results" / "cpu" / "table1.csv"
    runs = Path(os.environ.get("ALIGNLORA_RUNS") or root / "runs")
    if not t1.exists() or not any(runs.glob("*/TRAINED")):
        pytest.skip("no committed cpu Table 1 or no local run cache (runs/ is git-ignored; run `make reproduce` first)")
    _check_table1_against_cache(t1, runs)


def test_second_reproduce_recomputes_no_run(smoke):
    res, runs = smoke
    before = {p: p.stat().st_mtime_ns for p in runs.glob("*/TRAINED")}
    evals_before = {p: p.stat().st_mtime_ns for p in runs.glob("*/eval/*.json")}
    t1 = _body(res / "table1.csv")
    reproduce("smoke", results_dir=res, runs_dir_=runs, only=["table1"], log=lambda *a: None)
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/TRAINED")} == before
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/eval/*.json")} == evals_before
    assert _body(res / "table1.csv") == t1, "same cache → identical table"


def test_reproduce_resolves_relative_data_folder(tmp_path, monkeypatch):
    "A relative $ALIGNLORA_DATA (as in `ALIGNLORA_DATA=../shared/data make reproduce`) reaches the notebooks absolute."
    data = os.environ.get("ALIGNLORA_DATA")
    if not data: pytest.skip("no offline data folder ($ALIGNLORA_DATA)")
    monkeypatch.setenv("ALIGNLORA_DATA", os.path.relpath(Path(data).resolve(), Path.cwd()))
    res = tmp_path / "results" / "smoke"
    reproduce("smoke", results_dir=res, runs_dir_=tmp_path / "runs", only=["param_budgets"], log=lambda *a: None)
    out = (res / "notebooks" / "01_param_budgets.ipynb").read_text()
    assert f'data_dir = \\"{Path(data).resolve()}\\"' in out, "papermill got a data_dir other than the absolute folder"


def test_reproduce_missing_data_folder_fails_before_any_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLORA_DATA", "no/such/folder")
    res = tmp_path / "results" / "smoke"
    with pytest.raises(FileNotFoundError, match="ALIGNLORA_DATA"):
        reproduce("smoke", results_dir=res, runs_dir_=tmp_path / "runs", log=lambda *a: None)
    assert not res.exists(), "a failed start must not create results"
