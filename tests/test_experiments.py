"The run cache on the tiny model: nothing recomputed, interrupted runs finished, corrupt runs redone."
import json
import pytest

import alignlora.experiments as X
from alignlora.experiments import CALLS, grid, make_eval, run, run_grid, collect, run_status

TASKS = ["qnli", "piqa"]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLORA_RUNS", str(tmp_path / "runs"))
    for k in CALLS: CALLS[k] = 0
    return tmp_path / "runs"


def test_grid_is_cached_and_collect_rebuilds_it(runs):
    specs = grid(dict(profile="smoke", tasks=TASKS), method=["lora", "m-lora"], seed=[0, 1])
    ev = make_eval("smoke", TASKS)
    df = run_grid(specs, [ev], progress=False)
    assert CALLS == {"train": 4, "evaluate": 4}
    assert len(df) == 4 * len(TASKS)
    assert set(df.method) == {"lora", "m-lora"}
    df2 = run_grid(specs, [ev], progress=False)
    assert CALLS == {"train": 4, "evaluate": 4}, "a second call must recompute nothing"
    cols = ["key", "task", "acc", "n"]
    assert df2[cols].sort_values(cols).reset_index(drop=True).equals(df[cols].sort_values(cols).reset_index(drop=True))
    back = collect()
    assert back[cols].sort_values(cols).reset_index(drop=True).equals(df[cols].sort_values(cols).reset_index(drop=True))
    # a new evaluation of a cached run reuses its adapters: evaluate runs, train does not
    run(specs[0], [make_eval("smoke", ["winogrande"])])
    assert CALLS == {"train": 4, "evaluate": 5}


def test_interrupted_run_is_finished(runs, monkeypatch):
    spec = grid(dict(profile="smoke", tasks=TASKS), method=["lora"])[0]
    real = X.atomic_json

    def die_before_marker(path, obj):
        if str(path).endswith("TRAINED"): raise KeyboardInterrupt("killed after training, before the marker")
        return real(path, obj)

    monkeypatch.setattr(X, "atomic_json", die_before_marker)
    with pytest.raises(KeyboardInterrupt):
        run(spec)
    assert run_status(spec) == "partial"
    monkeypatch.setattr(X, "atomic_json", real)
    run(spec, [make_eval("smoke", TASKS)])
    assert run_status(spec) == "trained"
    assert CALLS["train"] == 2


def test_corrupt_run_is_detected_and_redone(runs):
    spec = grid(dict(profile="smoke", tasks=TASKS), method=["lora"])[0]
    r = run(spec)
    files = sorted((r["dir"] / "train").rglob("*.safetensors"))
    assert files, "train must save adapters as safetensors"
    files[0].write_bytes(files[0].read_bytes()[:-8] + b"corrupt!")
    assert run_status(spec) == "corrupt"
    run(spec)
    assert run_status(spec) == "trained"
    assert CALLS["train"] == 2
    assert list(runs.glob(f"{spec.key}.corrupt-*")), "the corrupt folder is kept aside, not deleted or read"
    # an unreadable TRAINED marker is also corrupt, never silently trusted
    (runs / spec.key / "TRAINED").write_text("{not json")
    assert run_status(spec) == "corrupt"
