"""The workflow configuration: schema defaults, and one-line errors that name the key."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from vlaflow.config import ConfigError, load_config, stage_settings, validate_config, write_config
from vlaflow.config import schema as load_schema

SHIPPED = Path(__file__).parents[1] / "config" / "config.yaml"


def test_empty_config_gets_every_default():
    config = validate_config({})
    assert config["model"] == {
        "backbone": "builtin:tiny-qwen2-vl",
        "policy_head_size": "tiny",
        "with_llm_head": True,
        "llm_loss_weight": 1.0,
        "action_dim": 14,
        "state_dim": 14,
        "chunk_size": 16,
    }
    assert config["data"]["cameras"] == ["top"] and config["data"]["image_size"] == [240, 320]
    assert config["stages"] == {}


def test_stage_lists_and_mix_weight_default():
    config = validate_config(
        {"stages": {"stage2": {"from": "backbone", "mlp_init": True, "robot": ["a"], "mix": {"vl_ratio": 0.33}}}}
    )
    assert config["stages"]["stage2"]["vl"] == [] and config["stages"]["stage2"]["freeze"] == []
    assert config["stages"]["stage2"]["moe"] is True
    assert config["stages"]["stage2"]["mix"] == {"vl_ratio": 0.33, "vl_loss_weight": 1.0}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"data": {"camera": ["top"]}}, "cfg: data: Additional properties are not allowed ('camera' was unexpected)"),
        ({"model": {"chunk_size": 0}}, "cfg: model.chunk_size: 0 is less than the minimum of 1"),
        ({"data": {"image_size": [64]}}, "cfg: data.image_size: [64] is too short"),
        ({"stages": {"stage3": {}}}, "cfg: stages.stage3: 'from' is a required property"),
        ({"stages": {"stage 3": {"from": "backbone"}}}, "cfg: stages: 'stage 3' does not match"),
        ({"stages": {"stage2": {"from": "backbone", "vl": ["a%x"]}}}, "cfg: stages.stage2.vl.0: 'a%x' does not match"),
        (
            {"stages": {"stage2": {"from": "backbone", "mix": {"vl_batch_fraction": 1.5}}}},
            "cfg: stages.stage2.mix.vl_batch_fraction: 1.5 is greater than",
        ),
        (
            {"stages": {"stage2": {"from": "backbone", "mix": {"vl_ratio": 0.3, "vl_batch_fraction": 0.2}}}},
            "cfg: stages.stage2.mix: set vl_ratio or vl_batch_fraction, not both",
        ),
        (
            {"stages": {"stage2": {"from": "backbone", "mix": {"vl_ratio": -0.5}}}},
            "cfg: stages.stage2.mix.vl_ratio: must be -1 (all VL data) or >= 0",
        ),
        (
            {"data": {"relative_actions": True}, "model": {"action_dim": 7, "state_dim": 8}},
            "cfg: data.relative_actions: actions relative to the state need model.action_dim (7) equal to "
            "model.state_dim (8)",
        ),
        (
            {"evaluation": {"vqa": {"kinds": {"Probe": "yes_or_no"}}}},
            "cfg: evaluation.vqa.kinds: 'Probe' is not among evaluation.vqa.benchmarks ['EasyVQA']",
        ),
        (
            {"evaluation": {"vqa": {"benchmarks": ["Probe"], "kinds": {"Probe": "yes_no"}}}},
            "cfg: evaluation.vqa.kinds.Probe: 'yes_no' is not a benchmark kind (multiple_choice, yes_or_no)",
        ),
        (["a", "list"], "cfg: expected a mapping of keys, got list"),
    ],
)
def test_errors_name_the_key(config, message):
    with pytest.raises(ConfigError) as error:
        validate_config(config, source="cfg")
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  root: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML at line 3"):
        load_config(path)


def test_shipped_default_is_valid_and_lists_the_embedded_datasets():
    config = load_config(SHIPPED)
    assert list(config["stages"]) == ["vlm", "baseline", "stage1", "stage2"]
    assert config["stages"]["stage2"] == {
        "from": "stage1",
        "moe": True,
        "mlp_init": False,
        "freeze": [],
        "robot": ["aloha_sim_transfer_cube"],
        "vl": ["easy_vqa"],
        "mix": {"vl_ratio": 0.33, "vl_loss_weight": 1.0},
    }
    assert yaml.safe_load(SHIPPED.read_text())["stages"]["baseline"] == {
        "from": "vlm",
        "moe": False,
        "mlp_init": True,
        "robot": ["aloha_sim_transfer_cube"],
        "training": {"max_steps": 1000, "save_steps": 250},
    }
    # the control arm trains on robot data exactly as long as stage 1
    assert config["stages"]["baseline"]["training"] == config["stages"]["stage1"]["training"]


def test_showcase_is_the_default_trained_longer_in_folders_of_its_own():
    """`--configfile config/config.yaml config/showcase.yaml`: Snakemake merges them key by key."""
    default = yaml.safe_load(SHIPPED.read_text())
    merged = copy.deepcopy(default)
    update_config(merged, yaml.safe_load(SHIPPED.with_name("showcase.yaml").read_text()))
    showcase = validate_config(merged, source="showcase")
    shipped = load_config(SHIPPED)
    assert showcase["results"] != shipped["results"] and showcase["data"]["root"] != shipped["data"]["root"]
    lmudata = [config["evaluation"]["vqa"]["lmudata"] for config in (showcase, shipped)]
    assert lmudata[0] != lmudata[1]

    def arms(stages):
        return {
            name: {key: value for key, value in row.items() if key not in ("training", "robot")}
            for name, row in stages.items()
        }

    assert arms(showcase["stages"]) == arms(shipped["stages"])  # the same arms, only longer and on more tasks
    for name in showcase["stages"]:
        assert stage_settings(showcase, name)["max_steps"] > stage_settings(shipped, name)["max_steps"], name
    assert showcase["stages"]["baseline"]["training"] == showcase["stages"]["stage1"]["training"]
    assert showcase["embedded"]["aloha_demos"]["episodes"] > shipped["embedded"]["aloha_demos"]["episodes"]
    assert showcase["evaluation"]["robot"]["episodes"] > shipped["evaluation"]["robot"]["episodes"]


def test_the_showcase_trains_and_evaluates_every_robot_arm_on_both_simulator_tasks():
    showcase = load_config(SHIPPED)
    update_config(showcase, yaml.safe_load(SHIPPED.with_name("showcase.yaml").read_text()))
    showcase = validate_config(showcase, source="showcase")
    shipped = load_config(SHIPPED)
    datasets = showcase["embedded"]["aloha_demos"]["datasets"]
    assert datasets == {"aloha_sim_transfer_cube": "transfer_cube", "aloha_sim_insertion": "insertion"}
    assert shipped["embedded"]["aloha_demos"]["datasets"] == {"aloha_sim_transfer_cube": "transfer_cube"}
    registry = yaml.safe_load((SHIPPED.parent / "datasets.yaml").read_text())
    assert all(registry[name]["kind"] == "robot" and "val" in registry[name]["splits"] for name in datasets)
    for name, row in showcase["stages"].items():
        if shipped["stages"][name].get("robot"):
            assert row["robot"] == list(datasets), name


def test_published_recipe_is_valid_and_names_the_gpu_environment():
    config = load_config(SHIPPED.with_name("chatvla_2b.yaml"))
    assert config["model"]["backbone"].startswith("hf:Qwen/Qwen2-VL-2B-Instruct@")
    assert (SHIPPED.parents[1] / config["conda_env"]).is_file() and "gpu" in config["conda_env"]
    assert config["launcher"]["kind"] == "deepspeed" and config["training"]["deepspeed"]
    assert config["embedded"] == {}  # nothing built locally: the data is the user's


def test_config_readme_documents_every_key_of_the_schema():
    documented = (Path(__file__).parents[1] / "config" / "README.md").read_text()
    schema = load_schema()
    keys = set()
    for section in ("model", "data"):
        keys |= set(schema["properties"][section]["properties"])
    keys |= set(schema["$defs"]["training"]["properties"])
    keys |= set(schema["$defs"]["stage"]["properties"])
    keys |= set(schema["$defs"]["stage"]["properties"]["mix"]["properties"])
    keys |= {key for key, value in schema["properties"].items() if "properties" not in value}  # results, ...
    keys |= set(schema["properties"]["launcher"]["properties"])
    for name in ("aloha_demos", "easy_vqa"):
        keys |= {f"{name}.{key}" for key in schema["properties"]["embedded"]["properties"][name]["properties"]}
    for name in ("vqa", "robot"):
        keys |= {f"{name}.{key}" for key in schema["properties"]["evaluation"]["properties"][name]["properties"]}
    missing = sorted(key for key in keys if f"`{key}`" not in documented and f"`{key}`," not in documented)
    assert not missing, missing


def test_written_config_is_replaced_only_when_it_changes(tmp_path):
    path = tmp_path / "results" / "config.yaml"
    write_config(validate_config({}), path)
    first = path.stat().st_mtime_ns
    write_config(validate_config({}), path)
    assert path.stat().st_mtime_ns == first  # the same config: the file is left alone
    changed = validate_config({"results": "elsewhere"})
    write_config(changed, path)
    assert load_config(path) == changed
    assert [entry.name for entry in path.parent.iterdir()] == ["config.yaml"]  # no staging file left
