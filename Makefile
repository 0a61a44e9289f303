# The two Quick start commands: `make run` and `make test`. Each sets up .venv itself on a fresh
# machine (torch first, pinned by envs/cpu-constraints.txt, then vlaflow with the workflow,
# test, simulator and DeepSpeed extras).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS := envs/cpu-constraints.txt
INSTALLED := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1

.PHONY: run test setup

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) torch
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) --editable '.[workflow,test,sim,deepspeed]'
	touch $@

# The whole embedded default through the workflow; a second run finds nothing to do.
run: $(INSTALLED)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(OFFLINE) snakemake --cores 8 all

# The workflow's quality gates first (format, lint), then the suite.
test: $(INSTALLED)
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	PATH="$(abspath $(VENV))/bin:$$PATH" $(OFFLINE) snakemake --lint
	$(OFFLINE) $(VENV)/bin/python -m pytest
