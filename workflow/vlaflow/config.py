"""The workflow configuration: one YAML file, validated against `schemas/config.schema.yaml`
(the same schema Snakemake's `validate()` uses), with the schema's defaults filled in."""

from importlib import resources
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators

from vlaflow.errors import ConfigError
from vlaflow.fs import replaced_file
from vlaflow.stages import Stage, stage_table


def _with_defaults(validator_class):
    """A validator that also writes each property's schema default into the instance."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, subschema["default"])
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": properties_with_defaults})


def schema() -> dict:
    return yaml.safe_load(resources.files("vlaflow").joinpath("schemas/config.schema.yaml").read_text())


def schema_defaults(*section: str) -> dict:
    """The schema's defaults for the settings of a config section (`"evaluation", "robot"`), for
    the command-line options that mirror them: one source of defaults."""
    node = schema()
    for key in section:
        node = node["properties"][key]
    return {name: setting["default"] for name, setting in node["properties"].items() if "default" in setting}


def read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None


def validate_config(config: dict, source: str = "config") -> dict:
    """Fill in defaults and check `config` in place; the first problem is raised naming its key."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(config).__name__}")
    validator = _with_defaults(Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(config), key=lambda error: list(error.absolute_path))
    if errors:
        error = errors[0]
        key = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ConfigError(f"{source}: {key}: {error.message}")
    check_rules(config, source)
    return config


def check_rules(config: dict, source: str = "config") -> dict[str, Stage]:
    """What the schema cannot say: rules between keys of a schema-valid config. Returns the
    checked stage table."""
    for stage, settings in config["stages"].items():
        mix = settings.get("mix", {})
        if "vl_ratio" in mix and "vl_batch_fraction" in mix:
            raise ConfigError(f"{source}: stages.{stage}.mix: set vl_ratio or vl_batch_fraction, not both")
        if "vl_ratio" in mix and mix["vl_ratio"] < 0 and mix["vl_ratio"] != -1:
            raise ConfigError(f"{source}: stages.{stage}.mix.vl_ratio: must be -1 (all VL data) or >= 0")
    model = config["model"]
    if config["data"]["relative_actions"] and model["action_dim"] != model["state_dim"]:
        raise ConfigError(
            f"{source}: data.relative_actions: actions relative to the state need model.action_dim "
            f"({model['action_dim']}) equal to model.state_dim ({model['state_dim']})"
        )
    _check_sim_task(config, source)
    _check_benchmark_kinds(config, source)
    return stage_table(config, source)


def _check_sim_task(config: dict, source: str) -> None:
    demos = config["embedded"].get("aloha_demos")
    if not demos:
        return
    try:
        from vlaflow.sim.tasks import SIM_TASKS
    except ImportError:  # without the simulator extra the demonstrations cannot be recorded at all
        return
    for dataset, task in demos["datasets"].items():
        if task not in SIM_TASKS:
            raise ConfigError(
                f"{source}: embedded.aloha_demos.datasets.{dataset}: {task!r} is not a simulator task "
                f"({', '.join(SIM_TASKS)})"
            )


def _check_benchmark_kinds(config: dict, source: str) -> None:
    from vlaflow.evaluation.benchmarks import BENCHMARK_KINDS

    vqa = config["evaluation"]["vqa"]
    for benchmark, kind in vqa["kinds"].items():
        if benchmark not in vqa["benchmarks"]:
            raise ConfigError(
                f"{source}: evaluation.vqa.kinds: {benchmark!r} is not among evaluation.vqa.benchmarks {vqa['benchmarks']}"
            )
        if kind not in BENCHMARK_KINDS:
            raise ConfigError(
                f"{source}: evaluation.vqa.kinds.{benchmark}: {kind!r} is not a benchmark kind ({', '.join(BENCHMARK_KINDS)})"
            )


def stage_settings(config: dict, stage: str) -> dict:
    """The config's `training` section with the stage's own `training` keys laid over it."""
    return {**config["training"], **config["stages"][stage].get("training", {})}


def write_config(config: dict, path: Path) -> None:
    """Write `config` to `path` as YAML unless the file holds it already. The file is replaced
    in one step: running jobs may be reading it."""
    text = yaml.safe_dump(config, sort_keys=False)
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return
    with replaced_file(path) as staged:
        staged.write_text(text)


def load_config(path: Path) -> dict:
    return validate_config(read_yaml(path), source=str(path))
