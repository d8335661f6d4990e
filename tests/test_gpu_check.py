"""`tests/gpu_check.py` on the CPU (`--device cpu --quick`): every section runs or says why it is skipped, the
CUDA-only rows are skipped with their reason, every method preset trains at both shapes, `segment_sdpa` matches
stock sdpa, and the throughput rows measure tokens/s."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wrapper_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "tests" / "gpu_check.sh")], check=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    res["returncode"], res["md"], res["log"] = p.returncode, out.read_text(), p.stdout + p.stderr
    return res


def _section(res, word):
    return next(s for s in res["sections"] if word in s["name"])


def test_every_section_ran_or_says_why(report):
    assert report["returncode"] == 0, report["log"][-3000:]
    from alignlora.models import resolve_dtype
    assert report["dtype"] == resolve_dtype("auto", "cpu")   # bf16 only where the CPU has bf16 units (else many times slower)
    assert len(report["sections"]) == 6
    assert all(s["status"] in ("ok", "skipped") for s in report["sections"]), [(s["name"], s.get("reason")) for s in report["sections"]]
    assert all(s.get("reason") for s in report["sections"] if s["status"] == "skipped")
    assert all(f"## {i}. {s['name']}" in report["md"] for i, s in enumerate(report["sections"], 1))


def test_cuda_only_rows_are_skipped_with_a_reason(report):
    rows = _section(report, "Varlen")["rows"] + _section(report, "Tokens/s")["rows"]
    flash = [r for r in rows if r.get("backend") == "flash_attention_2"]
    liger = [r for r in rows if "liger" in r.get("variant", "")]
    assert flash and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in flash)
    assert liger and all(r["status"] == "skipped" and r["reason"] for r in liger)


def test_every_method_trains_at_both_shapes(report):
    from alignlora.methods import METHODS
    rows = _section(report, "Training steps")["rows"]
    for shape in ("smollm2", "qwen2.5-3b"):
        done = {r["method"] for r in rows if r["shape"] == shape and r["status"] == "ok"}
        assert done == set(METHODS), (shape, set(METHODS) - done)
    assert all(r["finite"] and r["adapters_fp32"] for r in rows)


def test_segment_sdpa_matches_stock_sdpa(report):
    rows = _section(report, "segment_sdpa")["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    fp32 = next(r for r in rows if r["dtype"] == "float32")
    assert float(fp32["logits_rel"]) <= 1e-4
    assert float(fp32["grads_rel"]) <= 1e-4
    assert all(r["status"] == "ok" for r in rows)


def test_loop_and_flex_agree_on_cpu(report):
    rows = [r for r in _section(report, "Varlen")["rows"] if r["status"] != "skipped"]
    assert {r["backend"] for r in rows} >= {"loop"}
    assert all(float(r["out_rel"]) <= 1e-4 for r in rows)


def test_tokens_per_second_is_measured(report):
    rows = [r for r in _section(report, "Tokens/s")["rows"] if r["status"] == "ok"]
    assert {r["variant"].split(" ")[0] for r in rows} == {"ours", "stock"}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert all(0 < float(r["mfu"].rstrip("%")) for r in rows)
