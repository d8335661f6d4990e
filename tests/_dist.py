"Shared by the multi-process tests: run a script under torchrun (2 CPU ranks, gloo) and read each rank's JSON."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun_ranks(script_text: str, tmp_path: Path, port: int, timeout: int = 600, nproc: int = 2) -> list[dict]:
    "Write `script_text`, run it as `torchrun --nproc_per_node nproc script tmp_path`; return `rank{i}.json` of each rank."
    script = tmp_path / "torchrun_script.py"; script.write_text(script_text)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                        str(port), str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(nproc)]
