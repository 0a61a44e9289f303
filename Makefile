# The two Quick start commands: `make run` and `make test`. Each sets up .venv itself on a fresh
# machine (torch first, pinned by envs/cpu-constraints.txt, then vlaflow and its test extra).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS := envs/cpu-constraints.txt
INSTALLED := $(VENV)/.installed
RESULTS ?= results

.PHONY: run test setup

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) torch
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) --editable '.[test]'
	touch $@

run: $(INSTALLED)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlaflow download builtin:tiny-qwen2-vl $(RESULTS)/backbone
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlaflow make-vla-config $(RESULTS)/backbone $(RESULTS)/vla
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlaflow save-mlp-weights $(RESULTS)/backbone $(RESULTS)/mlp_weights.safetensors
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlaflow check-model $(RESULTS)/vla --mlp-weights $(RESULTS)/mlp_weights.safetensors

test: $(INSTALLED)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest
