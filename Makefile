# Two entry points on a fresh clone (see README.md):
#   make study   build the default corpus and run the tiny study end to end (CPU), print the table
#   make test    run the test suite (what CI runs)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: study test lint dvc-yaml apt-lists clean-work slurm-up slurm-down

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# apt-get download needs the package lists; a fresh machine may have none.
apt-lists:
	@if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi; fi

study: $(STAMP) apt-lists
	source $(VENV)/bin/activate && python -m moe_study.config.load params.yaml && dvc repro && \
	  cat results/$$(python -c 'from moe_study.config.load import load_params; print(load_params().study)')/summary.md

test: $(STAMP)
	source $(VENV)/bin/activate && ruff check . && python -m pytest -n 2 --dist loadfile -q --durations=12 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

dvc-yaml: $(STAMP)
	$(PY) -m moe_study.registry --write

clean-work:
	rm -rf work .snakemake

# a one-node SLURM on this machine (root; installs slurm-wlm + munge if missing): README, "Running on a SLURM cluster"
slurm-up: $(STAMP)
	$(PY) slurm/localcluster.py start work/slurm-local

slurm-down:
	$(PY) slurm/localcluster.py stop work/slurm-local
