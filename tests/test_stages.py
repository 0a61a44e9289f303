"""The stage table: arms declared in the config, checked before any job, trained by one rule."""

import copy
from pathlib import Path

import pytest
import yaml

from tests.data_factory import recipe_stages
from tests.workflow_helpers import planned_jobs, snakemake, tiny_workflow
from vlaflow.config import ConfigError, load_config, validate_config
from vlaflow.stages import lineage, stage_table

SHIPPED = Path(__file__).parents[1] / "config" / "config.yaml"


def test_the_embedded_default_declares_four_arms_in_report_order():
    table = stage_table(load_config(SHIPPED))
    assert list(table) == ["vlm", "baseline", "stage1", "stage2"]
    assert table["vlm"].evaluations == ("vqa",)
    assert {name: table[name].evaluations for name in ("baseline", "stage1", "stage2")} == dict.fromkeys(
        ("baseline", "stage1", "stage2"), ("vqa", "robot")
    )
    baseline = table["baseline"]
    assert (baseline.start, baseline.moe, baseline.mlp_init, baseline.freeze) == ("vlm", False, True, ())
    assert [stage.name for stage in lineage(table, "stage2")] == ["stage2", "stage1", "vlm"]


def test_the_published_recipes_optional_baseline_row_is_a_valid_arm():
    recipe = SHIPPED.with_name("chatvla_2b.yaml").read_text()
    commented = recipe[recipe.index("  # baseline:") : recipe.index("  stage2:")]
    row = "".join(line.replace("  # ", "  ", 1) + "\n" for line in commented.splitlines())
    config = yaml.safe_load(recipe.replace(commented, row))
    table = stage_table(validate_config(config))
    assert list(table) == ["stage1", "baseline", "stage2"]
    assert (table["baseline"].start, table["baseline"].moe, table["baseline"].evaluations) == (
        "backbone", False, ("vqa", "robot")
    )


def test_evaluations_follow_robot_data_through_the_stages_a_stage_starts_from():
    stages = recipe_stages()
    stages["chat"] = {"from": "stage2", "vl": ["vl_a"]}  # VL-only, but its model acts: stage 1 trained it
    table = stage_table(validate_config({"stages": stages}))
    assert table["chat"].evaluations == ("vqa", "robot")


def with_stage(name: str, **row) -> dict:
    stages = copy.deepcopy(recipe_stages())
    stages[name] = row
    return {"stages": stages}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (with_stage("probe", **{"from": "stage3"}, robot=["a"]), "cfg: stages.probe.from: 'stage3' is neither 'backbone' nor"),
        (
            {"stages": {"a": {"from": "b", "robot": ["x"]}, "b": {"from": "a", "robot": ["x"]}}},
            "cfg: stages.a.from: the stages start from each other in a cycle: a -> b -> a",
        ),
        (with_stage("report", **{"from": "stage1"}, robot=["a"]), "cfg: stages.report: the name is taken by the workflow"),
        (
            with_stage("fresh", **{"from": "backbone"}, robot=["a"]),
            "cfg: stages.fresh.mlp_init: a stage that starts from the backbone starts its MLPs",
        ),
        (
            with_stage("dense", **{"from": "vlm"}, moe=False, robot=["a"]),
            "cfg: stages.dense.mlp_init: vlm's model has the MoE and this stage a dense MLP",
        ),
        (
            with_stage("dense", **{"from": "vlm"}, moe=False, mlp_init=True, freeze=["vl_expert"], robot=["a"]),
            "cfg: stages.dense.freeze: vl_expert needs the MoE",
        ),
        (
            with_stage("stiff", **{"from": "stage1"}, freeze=["policy_head"], robot=["a"]),
            "cfg: stages.stiff.freeze: the stage trains on robot data, so policy_head cannot be frozen",
        ),
        (
            with_stage("talk", **{"from": "vlm"}, vl=["a"], evaluate=["robot"]),
            "cfg: stages.talk.evaluate: robot: neither this stage nor one it starts from trains on robot data",
        ),
        (with_stage("odd", **{"from": "vlm"}, freeze=["lm_head"], vl=["a"]), "cfg: stages.odd.freeze.0: 'lm_head' is not one of"),
    ],
)
def test_a_bad_stage_table_is_one_line_naming_the_key(config, message):
    with pytest.raises(ConfigError) as error:
        validate_config(config, source="cfg")
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


def test_a_config_declares_an_arm_and_the_workflow_trains_and_evaluates_it(tmp_path):
    config = tiny_workflow(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["stages"]["chat"] = {"from": "stage1", "vl": ["vl_a"], "freeze": ["robot_expert", "policy_head"]}
    config.write_text(yaml.safe_dump(settings))
    plan = snakemake(tmp_path, "-n", "--printshellcmds", "--cores", "2", "chat")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert planned_jobs(plan)["train"] == 3  # vlm, stage1, chat; stage2 is not needed
    assert " --stage chat " in plan.stdout and " --stage stage2 " not in plan.stdout
    assert f"--init {tmp_path / 'results' / 'models' / 'stage1'} " in plan.stdout

    everything = snakemake(tmp_path, "-n", "--cores", "2", "all")
    assert planned_jobs(everything)["eval_vqa"] == 4 and planned_jobs(everything)["eval_robot"] == 3
    report = everything.stdout[everything.stdout.index("rule report:") :]
    assert "results/eval/chat/robot" in report.split("\n\n")[0]


def test_an_unknown_arm_stops_the_workflow_before_any_job(tmp_path):
    config = tiny_workflow(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["stages"]["stage2"]["from"] = "stage_one"
    config.write_text(yaml.safe_dump(settings))
    result = snakemake(tmp_path, "--cores", "2", "all")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "stages.stage2.from" in line]
    listed = ", ".join(yaml.safe_load(config.read_text())["stages"])
    assert errors == [
        f"{config}: stages.stage2.from: 'stage_one' is neither 'backbone' nor a stage of this config (stages: {listed})"
    ], result.stderr
    assert "Traceback" not in result.stderr and "stages.py" not in result.stderr
    assert not (tmp_path / "results").exists()
