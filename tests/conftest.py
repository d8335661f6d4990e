"Shared test set-up: offline always; the data folder defaults to ../shared/data beside the repository."
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_shared = Path(__file__).resolve().parents[2] / "shared" / "data"
if "ALIGNLORA_DATA" not in os.environ and _shared.exists():
    os.environ["ALIGNLORA_DATA"] = str(_shared)
