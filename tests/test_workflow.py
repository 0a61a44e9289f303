"""The Snakemake workflow, run for real on a tiny configuration: targets, partial reruns,
resuming after the controller is killed, and configuration errors before any job."""

import json
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.workflow_helpers import embedded_workflow, planned_jobs, snakemake, start_snakemake, tiny_workflow
from vlaflow.training.checkpoints import COMPLETE_MARKER, METRICS_FILE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A complete run of `all`."""
    root = tmp_path_factory.mktemp("workflow")
    tiny_workflow(root)
    result = snakemake(root, "--cores", "2", "all")
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def test_all_builds_every_model_evaluation_and_the_report(finished):
    results = finished / "results"
    for stage in ("vlm", "stage1", "stage2"):
        assert (results / "models" / stage / "model.safetensors").exists()
        assert (results / "eval" / stage / "vqa" / "vqa_summary.json").exists()
    for stage in ("stage1", "stage2"):
        assert (results / "eval" / stage / "robot" / "open_loop.json").exists()
    assert (results / "report" / "report.html").exists()
    assert "forgetting table" in (results / "report" / "report.md").read_text().lower()
    for rule in ("vlm", "stage1", "stage2", "eval_vqa_stage2", "eval_robot_stage1"):
        benchmark = (results / "benchmarks" / f"{rule}.tsv").read_text().splitlines()
        assert benchmark[0].startswith("s\t") and float(benchmark[1].split("\t")[0]) > 0


def test_two_runs_of_the_same_config_give_the_same_models_and_table(finished, tmp_path):
    tiny_workflow(tmp_path)
    result = snakemake(tmp_path, "--cores", "2", "all")
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("vlm", "stage1", "stage2"):
        first, second = (load_file(root / "results" / "models" / stage / "model.safetensors") for root in (finished, tmp_path))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), stage
    table = "report/forgetting.csv"
    assert (finished / "results" / table).read_text() == (tmp_path / "results" / table).read_text()


def test_a_second_invocation_has_nothing_to_do(finished):
    result = snakemake(finished, "--cores", "2", "all")
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


def test_snakemakes_report_holds_every_result_with_its_caption(finished, tmp_path):
    result = snakemake(finished, "--report", str(tmp_path / "report.zip"))
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "report.zip") as archive:
        names = archive.namelist()
        page = archive.read("report/report.html").decode()
    shipped = {Path(name).name for name in names}
    assert {"report.html", "forgetting.csv", "vqa_summary.json", "open_loop.json"} <= shipped
    for stage in ("vlm", "stage1", "stage2"):  # each caption names its stage
        assert f'VQA accuracy of stage <tt class=\\"docutils literal\\">{stage}' in page, stage
    for stage in ("stage1", "stage2"):
        assert f'Robot control of stage <tt class=\\"docutils literal\\">{stage}' in page, stage
    assert "is the run's headline" in page  # the workflow's description


def test_stage2_ckpt_builds_only_what_stage2_needs(tmp_path):
    tiny_workflow(tmp_path)
    jobs = planned_jobs(snakemake(tmp_path, "-n", "stage2_ckpt"))
    assert jobs == {
        "download": 1, "vla_config": 1, "mlp_weights": 1, "data_check": 1, "train": 3, "stage_mlp_weights": 1,
        "stage2_ckpt": 1,
    }  # fmt: skip


def rerun_plan(root, **overrides) -> dict[str, int]:
    changed = tiny_workflow(root, **overrides)
    return planned_jobs(snakemake(root, "-n", "--cores", "2", "all", config=changed))


def test_changing_a_stage2_setting_reruns_stage2_and_what_follows(finished):
    jobs = rerun_plan(finished, stages__stage2__training__learning_rate=1e-4)
    assert jobs == {"train": 1, "eval_vqa": 1, "eval_robot": 1, "report": 1, "all": 1}


def test_changing_an_evaluation_setting_reruns_only_evaluation(finished):
    jobs = rerun_plan(finished, evaluation__vqa__max_new_tokens=3)
    assert jobs == {"eval_vqa": 3, "report": 1, "all": 1}
    tiny_workflow(finished)  # back to the finished configuration


def test_a_changed_stage_setting_retrains_the_stage_rather_than_resuming_its_old_checkpoints(tmp_path):
    tiny_workflow(tmp_path)
    assert snakemake(tmp_path, "--cores", "2", "stage2_ckpt").returncode == 0
    model = tmp_path / "results" / "models" / "stage2"
    before = (model / "model.safetensors").read_bytes()

    tiny_workflow(tmp_path, stages__stage2__training__learning_rate=1e-4)
    result = snakemake(tmp_path, "--cores", "2", "stage2_ckpt")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (model / "model.safetensors").read_bytes() != before
    steps = [json.loads(line)["step"] for line in (model / METRICS_FILE).read_text().splitlines()]
    assert steps[0] == 1
    log = (tmp_path / "results" / "logs" / "stage2.log").read_text()
    assert "its checkpoints were trained from other settings (training.learning_rate" in log
    assert "resuming from" not in log
    assert [path.name.split(".")[0] for path in (tmp_path / "results" / "work").glob("*.superseded-*")] == ["stage2"]


def snakemake_until_checkpoint(root, checkpoint):
    """`snakemake stage1` running in the background, once training has completed `checkpoint`."""
    process = start_snakemake(root, "--cores", "2", "stage1")
    deadline = time.monotonic() + 600
    while not (checkpoint / COMPLETE_MARKER).exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process


def test_a_signal_to_a_training_job_reaches_the_trainer_and_the_retry_resumes_alone(tmp_path):
    """SLURM or a user signals the job's process: the trainer must get it (no shell between them
    to orphan it), save, and leave the folder to the retry, which continues without a twin."""
    tiny_workflow(tmp_path, stages__stage1__training={"max_steps": 40, "save_steps": 5})
    work = tmp_path / "results" / "work" / "stage1"
    process = snakemake_until_checkpoint(tmp_path, work / "checkpoint-5")
    jobs = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(process.pid)], capture_output=True, text=True)
    training = [line.split()[0] for line in jobs.stdout.splitlines() if "train" in line and "--stage stage1" in line]
    assert len(training) == 1, jobs.stdout  # the job's process is the trainer itself
    subprocess.run(["kill", "-TERM", training[0]], check=True)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-4000:]
    log = (tmp_path / "results" / "logs" / "stage1.log").read_text()
    assert "resuming from" in log  # the retry's log
    entries = map(json.loads, (tmp_path / "results" / "models" / "stage1" / METRICS_FILE).read_text().splitlines())
    logged = [entry["step"] for entry in entries if "loss" in entry]  # no interleaving of two trainers
    assert logged == list(range(1, 41))


# Spaces, quotes and command substitutions: the shell must hand every value over as it is.
HOSTILE = "it's a $(touch PWNED) `touch PWNED`"


def test_paths_with_spaces_quotes_and_substitutions_reach_the_commands_as_they_are(tmp_path):
    config = tiny_workflow(tmp_path)  # data, LMUData and a config under tmp_path, then moved to hostile names
    data, lmudata, results = (tmp_path / f"{name} {HOSTILE}" for name in ("data", "LMUData", "results"))
    (tmp_path / "data").rename(data)
    (tmp_path / "LMUData").rename(lmudata)
    settings = yaml.safe_load(config.read_text())
    settings["results"] = str(results)
    settings["data"].update(root=str(data), registry=str(data / "datasets.yaml"))
    settings["evaluation"]["vqa"]["lmudata"] = str(lmudata)
    config.write_text(yaml.safe_dump(settings))
    result = snakemake(tmp_path, "--cores", "2", "all")
    assert result.returncode == 0, result.stderr[-4000:]
    assert not list(tmp_path.rglob("PWNED")) and not list(Path.cwd().glob("PWNED"))
    assert (results / "report" / "report.html").is_file()
    assert (results / "eval" / "stage2" / "vqa" / "vqa_summary.json").is_file()


def test_a_hostile_backbone_source_is_refused_as_it_is_never_run(tmp_path):
    source = f"builtin:tiny-qwen2-vl{HOSTILE}"
    tiny_workflow(tmp_path, model__backbone=source)
    result = snakemake(tmp_path, "--cores", "1", "download")
    assert result.returncode != 0
    log = (tmp_path / "results" / "logs" / "download.log").read_text()
    assert f"vlaflow download: error: source {source!r}: not one of" in log
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("evaluation__vqa__benchmarks", ["EasyVQA; touch PWNED"]),
        ("embedded__easy_vqa", {"dataset": "$(touch PWNED)"}),
        ("embedded__aloha_demos", {"datasets": {"../elsewhere": "transfer_cube"}}),
    ],
)
def test_names_that_become_file_names_are_refused_unless_plain(tmp_path, key, value):
    tiny_workflow(tmp_path, **{key: value})
    result = snakemake(tmp_path, "--cores", "1", "-n", "all")
    assert result.returncode != 0
    assert "does not match '^[A-Za-z0-9_][A-Za-z0-9_.-]*$'" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists() and not list(tmp_path.rglob("PWNED"))


def test_a_config_error_stops_the_workflow_before_any_job(tmp_path):
    config = tiny_workflow(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["training"]["max_stepz"] = 3
    config.write_text(yaml.safe_dump(settings))
    result = snakemake(tmp_path, "--cores", "2", "all")
    assert result.returncode != 0
    assert "max_stepz" in result.stderr and "Additional properties are not allowed" in result.stderr
    assert not (tmp_path / "results").exists()


def test_killing_snakemake_during_stage1_then_rerunning_resumes_training(tmp_path):
    tiny_workflow(tmp_path, stages__stage1__training={"max_steps": 60, "save_steps": 5})
    work = tmp_path / "results" / "work" / "stage1"
    process = snakemake_until_checkpoint(tmp_path, work / "checkpoint-5")
    process.send_signal(signal.SIGKILL)  # the controller dies; its job keeps running, then is killed too
    process.wait()
    # `--`: without it pkill reads the pattern as an unknown option and kills nothing, leaving the
    # trainer to race the rerun for its work folder
    killed = subprocess.run(["pkill", "-9", "-f", "--", f"--workdir {work}"], check=False)
    assert killed.returncode == 0  # at least the trainer matched
    assert not (tmp_path / "results" / "models" / "stage1").exists()

    assert snakemake(tmp_path, "--unlock").returncode == 0
    result = snakemake(tmp_path, "--cores", "2", "--rerun-incomplete", "stage1")
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "results" / "logs" / "stage1.log").read_text()
    assert "resuming from" in log and "(step 0)" not in log
    assert (tmp_path / "results" / "models" / "stage1" / "model.safetensors").exists()


def test_the_launcher_starts_training_under_torchrun(tmp_path):
    tiny_workflow(tmp_path, launcher__kind="torchrun", launcher__processes_per_node=2, launcher__port=29531)
    result = snakemake(tmp_path, "--cores", "2", "stage1")
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ("vlm", "stage1"):
        work = tmp_path / "results" / "work" / stage
        assert sorted(path.name for path in work.glob("samples-rank*.jsonl")) == [
            "samples-rank0.jsonl", "samples-rank1.jsonl",
        ]  # fmt: skip
        assert (tmp_path / "results" / "models" / stage / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("launcher", "command", "resources"),
    [
        (
            {"kind": "deepspeed", "processes_per_node": 8},
            "deepspeed --num_gpus 8 --master_port 29500 --no_local_rank --module vlaflow.cli train",
            "gpu=8",
        ),
        (
            {"kind": "srun", "nodes": 2, "processes_per_node": 4, "port": 29600},
            "srun --nodes 2 --ntasks-per-node 1 torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d "
            "--rdzv-endpoint $(hostname):29600 -m vlaflow.cli train",
            "mpi=srun, nodes=2, tasks=2, gres=gpu:4",
        ),
    ],
)
def test_the_launcher_shapes_the_training_command_and_its_resources(tmp_path, launcher, command, resources):
    tiny_workflow(tmp_path, **{f"launcher__{key}": value for key, value in launcher.items()})
    plan = snakemake(tmp_path, "-n", "--printshellcmds", "stage1")
    assert plan.returncode == 0, plan.stderr[-3000:]
    for stage in ("vlm", "stage1"):
        command_at = plan.stdout.index(f" --stage {stage} ")
        job = plan.stdout[plan.stdout.rindex("rule train:", 0, command_at) : plan.stdout.index("\n\n", command_at)]
        assert f"{command} --config " in job and f"wildcards: stage={stage}" in job, job
        assert resources in job, job


def test_a_second_configfile_changes_the_first_key_by_key(tmp_path):
    """How config/showcase.yaml runs: `--configfile config/config.yaml config/showcase.yaml`."""
    base = tiny_workflow(tmp_path)
    longer = tmp_path / "longer.yaml"
    change = {"results": str(tmp_path / "longer"), "stages": {"stage1": {"training": {"max_steps": 9}}}}
    longer.write_text(yaml.safe_dump(change))
    plan = snakemake(tmp_path, "-n", "all", "--configfile", str(base), str(longer))
    assert plan.returncode == 0, plan.stderr[-3000:]
    resolved = yaml.safe_load((tmp_path / "longer" / "config.yaml").read_text())
    settings = yaml.safe_load(base.read_text())
    assert resolved["stages"]["stage1"]["training"] == {"max_steps": 9}
    assert resolved["stages"]["stage1"]["from"] == settings["stages"]["stage1"]["from"]
    assert set(resolved["stages"]) == set(settings["stages"])
    assert resolved["data"] == {**resolved["data"], **settings["data"]}


def test_a_configfile_stands_alone_and_config_overrides_reach_the_commands(tmp_path):
    settings = yaml.safe_load(tiny_workflow(tmp_path).read_text())
    (tmp_path / "config").mkdir()  # the Snakefile's default, which has a vlm stage
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(settings))
    del settings["stages"]["vlm"]
    settings["stages"]["stage1"]["from"] = "backbone"
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump(settings))

    elsewhere = tmp_path / "elsewhere"
    plan = snakemake(tmp_path, "-n", "--printshellcmds", "all", "--config", f"results={elsewhere}", config=own)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert planned_jobs(plan)["train"] == 2 and "--stage vlm" not in plan.stdout
    resolved = yaml.safe_load((elsewhere / "config.yaml").read_text())
    assert resolved["results"] == str(elsewhere) and set(resolved["stages"]) == {"stage1", "stage2"}
    assert resolved["training"] == {**settings["training"], **resolved["training"]}  # the file's, defaults added
    assert f"train --config {elsewhere / 'config.yaml'} --stage stage1 " in plan.stdout
    assert not (tmp_path / "results").exists()


def test_each_simulator_dataset_is_recorded_with_its_task_for_the_stages_that_read_it(tmp_path):
    """config/showcase.yaml's layout: two demonstration sets, each robot arm trained on both."""
    config_path = embedded_workflow(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    datasets = {"aloha_sim_transfer_cube": "transfer_cube", "aloha_sim_insertion": "insertion"}
    config["embedded"]["aloha_demos"]["datasets"] = datasets
    for stage in ("baseline", "stage1", "stage2"):
        config["stages"][stage]["robot"] = list(datasets)
    config_path.write_text(yaml.safe_dump(config))
    plan = snakemake(tmp_path, "-n", "--printshellcmds", "--cores", "2", "stage1")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert planned_jobs(plan)["aloha_demos"] == 2
    data = tmp_path / "resources" / "data"
    for name, task in datasets.items():
        assert f"vlaflow data aloha-demos {data / name} --task {task} " in plan.stdout
    (stage1,) = [
        block for block in plan.stdout.split("rule ") if block.startswith("train:") and "stage=stage1" in block
    ]
    inputs = next(line for line in stage1.splitlines() if line.strip().startswith("input:"))
    assert all(str(data / name) in inputs for name in datasets), stage1
