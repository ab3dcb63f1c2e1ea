# ds-smoes: `make demo` runs the main job, `make test` runs the test suite.
# Both create the virtualenv .venv on first use (about 3 minutes: torch's CPU wheel, DeepSpeed,
# Ray, MLflow, transformers) and reinstall when pyproject.toml changes.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
MLFLOW_DB := $(CURDIR)/mlflow.db

.PHONY: demo demo-canvas demo-figures docs-check test test-fast venv mlflow-ui clean sweep-smoke sweep sweep-gates sweep-report bench-comm bench-infer compare-compression

# a port nothing listens on, for the launcher's rendezvous: a second demo beside a running one (or any process on
# DeepSpeed's default 29500) does not fail with EADDRINUSE
FREE_PORT = $(shell python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 is required); set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build (a looser spec pulls the CUDA wheels, several GB)
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

# Train the SMoES MoE-VLM on 2 CPU ranks (expert parallelism 2), print the figures,
# log the run to MLflow ($(MLFLOW_DB)) and write runs/demo/metrics.json.
demo: $(STAMP)
	$(VENV)/bin/deepspeed --master_port $(FREE_PORT) --num_gpus 2 --module ds_smoes.train --config configs/demo.yaml \
		--output-json runs/demo/metrics.json --tracking-uri sqlite:///$(MLFLOW_DB)
	@echo "figures: runs/demo/metrics.json   MLflow UI: make mlflow-ui"

# The canvas task through the whole MoE-LLaVA recipe (docs/recipe.md), seed 0, SMoES: stage 0 (the vision encoder),
# the language model, stage I (projector alignment), stage II (dense), stage III (the upcycled MoE, 2 CPU ranks,
# ep_size 2, rank_once); about 6 minutes here.  Prints each stage's figures and stage III's per-task accuracy, MSI
# and EP bytes; finished stages are reused on the next run (remove runs/recipe/canvas32 to start over).
demo-canvas: $(STAMP)
	$(PY) -m ds_smoes.pipeline --config configs/recipe/canvas32.yaml --seed 0 --variant smoes \
		--tracking-uri sqlite:///$(MLFLOW_DB)
	@echo "figures: runs/recipe/canvas32/seed0/moe-smoes/metrics.json   MLflow UI: make mlflow-ui"

# README's table of the demo's figures, from the last `make demo`, with the machine that measured them
demo-figures: $(STAMP)
	$(PY) ci/demo_figures.py runs/demo/metrics.json --write

# For documentation changes: run the demo (into runs/docs-check, no MLflow run) and check that README quotes
# exactly its figures.  Floats of a 1,900-step run differ between CPUs, so this holds on the machine that
# wrote the table; `make test` checks what must hold on any machine (tests/test_demo_figures.py).
docs-check: $(STAMP)
	$(PY) ci/demo_figures.py --run-demo runs/docs-check --check

# the whole suite (under 20 minutes on 2 cores), then its 25 slowest tests.  The package is byte-compiled first:
# the suite starts a few hundred Python processes, and where PYTHONDONTWRITEBYTECODE is set none of them would
# keep what it compiled
test: $(STAMP)
	$(PY) -m compileall -q -j 0 ds_smoes ray_jobs tests ci >/dev/null
	$(PY) -m pytest -q --durations=25

# the unit tests only (no multi-process runs)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# Ray sweeps (docs/sweeps.md): a local Ray in the sweep's process, MLflow parent + children.
sweep-smoke: $(STAMP)
	$(PY) ray_jobs/sweep.py run configs/sweeps/smoke.yaml --tracking-uri sqlite:///$(MLFLOW_DB)

sweep: $(STAMP)
	$(PY) ray_jobs/sweep.py run configs/sweeps/bins_scores.yaml --tracking-uri sqlite:///$(MLFLOW_DB)

# every gate and the KL ablation, 3 seeds, the comparison recipe (21 trials; about 70 minutes on 2 cores)
sweep-gates: $(STAMP)
	$(PY) ray_jobs/sweep.py run configs/sweeps/gates.yaml --tracking-uri sqlite:///$(MLFLOW_DB)

sweep-report: $(STAMP)
	$(PY) ray_jobs/sweep.py report --tracking-uri sqlite:///$(MLFLOW_DB)

# The EP communication benchmark (docs/bench.md): trains the SMoES and top-k demo models into runs/bench/
# when missing, measures the variants on 2 gloo ranks, simulates 2..64 ranks; runs/bench/comm.json + MLflow.
bench-comm: $(STAMP)
	$(PY) -m ds_smoes.bench comm --tracking-uri sqlite:///$(MLFLOW_DB)

# Serving the trained models (docs/bench.md, "infer"): trains the dense, top-k, hard, SMoES and SMoES-one-bin models
# into runs/bench/ when missing (about 6 minutes each here), then prefill, decode, EP bytes and accuracy at ep_size 1, 2.
bench-infer: $(STAMP)
	$(PY) -m ds_smoes.bench infer --tracking-uri sqlite:///$(MLFLOW_DB)

# Visual token compression (docs/compression.md): 39 canvas runs, about 2 hours here; run again to resume.
compare-compression: $(STAMP)
	$(PY) -m ds_smoes.compare --suite compression --tracking-uri sqlite:///$(MLFLOW_DB)

mlflow-ui: $(STAMP)
	@$(PY) -m ds_smoes.app.tracking --tracking-uri sqlite:///$(MLFLOW_DB)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(MLFLOW_DB) --host 127.0.0.1 --port 5000 --workers 1

clean:
	rm -rf runs data/digits
