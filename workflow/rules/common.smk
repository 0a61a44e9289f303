# Configuration checks and the helpers every phase uses.
import json
import os
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from vlaflow.config import ConfigError, check_rules, write_config
from vlaflow.stages import ROBOT_CONTROL, VQA

# Defaults are filled in here, and a wrong type or unknown key stops the workflow before any job.
CONFIG_SOURCE = workflow.configfiles[-1]
validate(config, "../schemas/config.schema.yaml")
# The stage table (config `stages`): every training arm, what it starts from and what follows it.
try:
    STAGE_TABLE = check_rules(config, CONFIG_SOURCE)
except ConfigError as error:
    # one line naming the file and the key, not a traceback through vlaflow's modules
    raise WorkflowError(str(error)) from None

RESULTS = config["results"]
# The vlaflow commands read the config as Snakemake resolved it (the config file, any --config
# overrides, the defaults), which the rules' settings fingerprints describe.
CONFIG_FILE = f"{RESULTS}/config.yaml"
write_config(config, CONFIG_FILE)
DATA_ROOT = config["data"]["root"]
STAGES = list(STAGE_TABLE)
VQA_STAGES = [name for name, stage in STAGE_TABLE.items() if VQA in stage.evaluations]
ROBOT_STAGES = [
    name for name, stage in STAGE_TABLE.items() if ROBOT_CONTROL in stage.evaluations
]
ENV = os.path.join(workflow.basedir, config["conda_env"])
# Training and evaluation ask for launcher.threads (8 by default) and the simulator demos for 8:
# under the README's `--cores 8` such jobs run one at a time, each on every CPU it may use (vlaflow
# caps its threads and processes at those), rather than several at once oversubscribing a laptop's
# cores, which makes PyTorch's OpenMP threads spin against each other and every job several times
# slower. A config whose model gains little from a second thread asks for fewer, and Snakemake
# runs that many more of its jobs at once.
HEAVY_THREADS = config["launcher"]["threads"]
DEMO_THREADS = 8
# Logs, benchmarks and the resumable work folders sit beside the declared outputs, never inside:
# Snakemake deletes the outputs of a failed job, and training must be able to resume.
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"


wildcard_constraints:
    stage="|".join(STAGES) or "(?!)",
    vqa_stage="|".join(VQA_STAGES) or "(?!)",
    robot_stage="|".join(ROBOT_STAGES) or "(?!)",


def result(path):
    return f"{RESULTS}/{path}"


def embedded(name):
    """The settings of one of the embedded default's datasets, or None when the config skips it."""
    return config["embedded"].get(name)


def cli_options(**options):
    """Command-line options as separate words, each quoted by `{params.options:q}` in a shell
    command. `--key value` (`--key v1 v2` for a list), `--key` for True, `--no-key` for False,
    nothing for None."""
    words = []
    for key, value in options.items():
        name = key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            words.append(f"--{name}")
        elif value is False:
            words.append(f"--no-{name}")
        elif isinstance(value, (list, tuple)):
            words += [f"--{name}", *map(str, value)]
        else:
            words += [f"--{name}", str(value)]
    return words


def embedded_data(stage):
    """The data folders the workflow builds and this stage reads (for the order of the jobs)."""
    built = {"robot": sim_datasets(), "vl": []}
    if embedded("easy_vqa"):
        built["vl"].append(embedded("easy_vqa")["dataset"])
    folders = []
    for kind, datasets in built.items():
        listed = {spec.split("%")[0] for spec in config["stages"][stage].get(kind, [])}
        folders += [
            f"{DATA_ROOT}/{name}" for name in datasets if {name, "all"} & listed
        ]
    return folders


def sim_datasets():
    """The simulator demonstration sets the workflow records: registry name -> task."""
    return embedded("aloha_demos")["datasets"] if embedded("aloha_demos") else {}


def fingerprint(*keys, stage=None):
    """The config values a job's output depends on, as one string: a change reruns the job and
    everything after it; nothing else in the config does."""
    value = {key: config[key] for key in keys}
    if stage is not None:
        value["stage"] = config["stages"][stage]
    return json.dumps(value, sort_keys=True)


def data_fingerprint():
    """What the data check depends on: the data settings and the datasets each stage lists, not
    how the stages train."""
    datasets = {
        stage: {key: settings.get(key) for key in ("robot", "vl", "mix")}
        for stage, settings in config["stages"].items()
    }
    return json.dumps(
        {"data": config["data"], "model": config["model"], "datasets": datasets},
        sort_keys=True,
    )


def launch(stage_command):
    """The command line that starts `vlaflow <stage_command>` under the configured launcher."""
    launcher = config["launcher"]
    per_node, nodes, port = (
        launcher["processes_per_node"],
        launcher["nodes"],
        launcher["port"],
    )
    entry = f"-m vlaflow.cli {stage_command}"
    if launcher["kind"] == "torchrun":
        return f"torchrun --nproc-per-node {per_node} --master-port {port} {entry}"
    if launcher["kind"] == "deepspeed":
        # without --no_local_rank, the launcher appends --local_rank=N to vlaflow's arguments;
        # each process reads its rank from LOCAL_RANK, which the launcher sets either way
        return f"deepspeed --num_gpus {per_node} --master_port {port} --no_local_rank --module vlaflow.cli {stage_command}"
    if launcher["kind"] == "srun":
        rendezvous = f"--rdzv-backend c10d --rdzv-endpoint $(hostname):{port}"
        return f"srun --nodes {nodes} --ntasks-per-node 1 torchrun --nnodes {nodes} --nproc-per-node {per_node} {rendezvous} {entry}"
    return f"vlaflow {stage_command}"


def launch_resources():
    """A training job's resources that follow from its launcher: a GPU per process (on several
    nodes, per node through `gres`, and the SLURM executor's `mpi`). Locally, without
    `--resources gpu=N`, Snakemake does not count GPUs; on SLURM they become --gpus / --gres.
    """
    launcher = config["launcher"]
    per_node, nodes = launcher["processes_per_node"], launcher["nodes"]
    if launcher["kind"] == "srun":
        return {
            "mpi": "srun",
            "nodes": nodes,
            "tasks": nodes,
            "gres": f"gpu:{per_node}",
        }
    return {"gpu": per_node}


def train_inputs(w):
    """What a stage's training job reads: the model it starts from (the VLA folder, or another
    stage's model) and, with mlp_init, that model's saved MLP weights."""
    stage = STAGE_TABLE[w.stage]
    inputs = {"check": rules.data_check.output, "data": embedded_data(stage.name)}
    if stage.starts_from_backbone:
        inputs["init"] = rules.vla_config.output[0]
        mlp = rules.mlp_weights.output[0]
    else:
        inputs["init"] = result(f"models/{stage.start}")
        mlp = result(f"{stage.start}_mlp_weights.safetensors")
    if stage.mlp_init:
        inputs["mlp"] = mlp
    return inputs


def report_runs(w):
    """`vlaflow report`'s --run arguments, one word each (the rule quotes them)."""
    arguments = []
    for stage in STAGES:
        folders = [
            result(f"eval/{stage}/{evaluation}")
            for evaluation in STAGE_TABLE[stage].evaluations
        ]
        arguments += ["--run", stage, result(f"models/{stage}"), *folders]
    return arguments
