# The two Quick start commands: `make run` and `make test`. Each sets up .venv itself on a fresh
# machine (torch first, pinned by envs/cpu-constraints.txt, then vlaflow with the workflow,
# test, simulator, DeepSpeed and VLMEvalKit extras, then VLMEvalKit itself without its dependencies:
# they include torchvision, which cannot share the CPU torch).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS := envs/cpu-constraints.txt
INSTALLED := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1

# The model, training and evaluation tests again, against the newest transformers that
# pyproject.toml admits: the pins would hide a release that breaks vlaflow (5.24 renamed the
# language model's cache). Everything else stays pinned.
NEWEST_VENV ?= .venv-newest
NEWEST_INSTALLED := $(NEWEST_VENV)/.installed
NEWEST_TESTS := tests/test_model.py tests/test_mlp_weights.py tests/test_vla_config.py tests/test_backbone.py \
	tests/test_release_layout.py tests/test_collator.py tests/test_training.py tests/test_eval_vqa.py \
	tests/test_eval_robot.py

.PHONY: run test test-newest setup

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) torch
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) --editable '.[workflow,test,sim,deepspeed,vlmevalkit]'
	$(VENV)/bin/pip install --quiet --constraint $(CONSTRAINTS) --no-deps ms-vlmeval
	touch $@

# The whole embedded default through the workflow; a second run finds nothing to do.
run: $(INSTALLED)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(OFFLINE) snakemake --cores 8 all

# The workflow's quality gates first (format, lint), then the suite.
test: $(INSTALLED)
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	PATH="$(abspath $(VENV))/bin:$$PATH" $(OFFLINE) snakemake --lint
	$(OFFLINE) $(VENV)/bin/python -m pytest

$(NEWEST_INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(NEWEST_VENV)
	grep -v '^transformers==' $(CONSTRAINTS) > $(NEWEST_VENV)/constraints.txt
	$(NEWEST_VENV)/bin/pip install --quiet --constraint $(NEWEST_VENV)/constraints.txt torch
	$(NEWEST_VENV)/bin/pip install --quiet --constraint $(NEWEST_VENV)/constraints.txt --upgrade \
		--editable '.[test,sim,deepspeed]' transformers
	touch $@

test-newest: $(NEWEST_INSTALLED)
	$(NEWEST_VENV)/bin/python -c 'import transformers; print("transformers", transformers.__version__)'
	$(OFFLINE) $(NEWEST_VENV)/bin/python -m pytest $(NEWEST_TESTS)
