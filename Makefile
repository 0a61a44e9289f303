# The two Quick start commands: `make run` and `make test`. Each sets up .venv itself on a fresh
# machine (torch first, pinned by envs/cpu-constraints.txt, then vlaflow and its test extra).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS := envs/cpu-constraints.txt
INSTALLED := $(VENV)/.installed
RESULTS ?= results
OFFLINE := HF_HUB_OFFLINE=1

.PHONY: run test setup

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) torch
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) --editable '.[test,sim,deepspeed]'
	touch $@

# Each step's output is its make target, so a second `make run` redoes only what is missing.
run: $(RESULTS)/vla $(RESULTS)/mlp_weights.safetensors
	$(OFFLINE) $(VENV)/bin/vlaflow check-model $(RESULTS)/vla --mlp-weights $(RESULTS)/mlp_weights.safetensors

$(RESULTS)/backbone: | $(INSTALLED)
	$(OFFLINE) $(VENV)/bin/vlaflow download builtin:tiny-qwen2-vl $@

$(RESULTS)/vla: $(RESULTS)/backbone
	$(OFFLINE) $(VENV)/bin/vlaflow make-vla-config $< $@

$(RESULTS)/mlp_weights.safetensors: $(RESULTS)/backbone
	$(OFFLINE) $(VENV)/bin/vlaflow save-mlp-weights $< $@

test: $(INSTALLED)
	$(OFFLINE) $(VENV)/bin/python -m pytest
