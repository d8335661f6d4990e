"Shared test set-up: offline always; the data folder defaults to ../shared/data beside the repository."
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "ALIGNLORA_DATA" not in os.environ and _shared.exists():
    os.environ["ALIGNLORA_DATA"] = str(_shared)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    "A cold smoke reproduction on the local executor: (results/smoke folder, run cache); the reference of the executors' tests."
    from alignlora.experiments import reproduce
    root = tmp_path_factory.mktemp("repro")
    res, runs = root / "results" / "smoke", root / "runs"
    reproduce("smoke", results_dir=res, runs_dir_=runs, log=lambda *a: None)
    return res, runs
