"""The real VLMEvalKit (PyPI `ms-vlmeval`, installed by `make setup` without its dependencies:
see the Makefile), imported module by module.

VLMEvalKit's package initialisers import every model and dataset it supports, and with them
torchvision, decord and API clients that cannot share vlaflow's CPU environment. The scoring,
dataset, model-API and inference modules that vlaflow's parity tests call import only the small
set of packages in pyproject's `vlmevalkit` extra, so this helper registers VLMEvalKit's packages
without running their `__init__.py` and imports those modules themselves, unchanged. Two names the
skipped initialisers define are given here: `vlmeval.config.supported_VLM`, VLMEvalKit's model
registry (filled by the caller, as its README has users do), and `vlmeval.dataset.DATASET_TYPE`,
which only VLMEvalKit's video models call.
"""

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

PACKAGES = ("vlmeval", "vlmeval.dataset", "vlmeval.vlm", "vlmeval.api")


def _not_loaded(*args, **kwargs):
    raise RuntimeError("vlmeval.dataset's registry is not loaded (its initialiser imports torchvision)")


def load() -> types.SimpleNamespace:
    """VLMEvalKit's modules (they read benchmarks from `$LMUData`)."""
    loaded = sys.modules.get("vlmeval")
    if loaded is not None and hasattr(loaded, "__path__"):
        root = Path(loaded.__path__[0])
    else:
        spec = importlib.util.find_spec("vlmeval")
        if spec is None:
            pytest.fail("VLMEvalKit is not installed: `make setup` installs ms-vlmeval without its dependencies")
        root = Path(spec.origin).parent
    for name in PACKAGES:
        if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
    sys.modules["vlmeval.dataset"].DATASET_TYPE = _not_loaded
    config = sys.modules.setdefault("vlmeval.config", types.ModuleType("vlmeval.config"))
    # one registry for the session: `vlmeval.inference` keeps the dict it imported first
    config.__dict__.setdefault("supported_VLM", {})
    return types.SimpleNamespace(
        matching=importlib.import_module("vlmeval.utils.matching_util"),
        multiple_choice=importlib.import_module("vlmeval.dataset.utils.multiple_choice"),
        image_mcq=importlib.import_module("vlmeval.dataset.image_mcq"),
        image_yorn=importlib.import_module("vlmeval.dataset.image_yorn"),
        yorn=importlib.import_module("vlmeval.dataset.utils.yorn"),
        smp=importlib.import_module("vlmeval.smp"),
        base=importlib.import_module("vlmeval.vlm.base"),
        inference=importlib.import_module("vlmeval.inference"),
        config=config,
    )
