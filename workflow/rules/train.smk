# One training rule for every stage of the stage table (config `stages`): each keeps its
# resumable checkpoints in results/work/<stage>, outside the declared output, so a retried or rerun
# job continues from its last checkpoint, and the model folder appears only when training ends.
# Each stage's name is also a target (`snakemake stage1`).


rule train:
    input:
        unpack(train_inputs),
    output:
        directory(result("models/{stage}")),
    log:
        f"{LOGS}/{{stage}}.log",
    benchmark:
        f"{BENCHMARKS}/{{stage}}.tsv"
    retries: 2
    conda:
        ENV
    container:
        config["container"]
    threads: HEAVY_THREADS
    resources:
        **launch_resources(),
    params:
        config=CONFIG_FILE,
        # built from the schema's enum and integers alone; every other value is quoted
        launch=launch("train"),
        workdir=lambda w: result(f"work/{w.stage}"),
        mlp=lambda w, input: (
            ["--mlp-weights", input.mlp] if "mlp" in input.keys() else []
        ),
        settings=lambda w: fingerprint("data", "model", "training", stage=w.stage),
    # `exec`: the job's signals (a scheduler's SIGTERM) reach the launcher or trainer, not only the shell
    shell:
        "exec {params.launch} --config {params.config:q} --stage {wildcards.stage:q} --init {input.init:q} "
        "{params.mlp:q} --workdir {params.workdir:q} --out {output:q} > {log:q} 2>&1"


# A stage's MLP weights (its VL expert, or its dense MLP), for the stages that start from it with mlp_init.
rule stage_mlp_weights:
    input:
        result("models/{stage}"),
    output:
        result("{stage}_mlp_weights.safetensors"),
    log:
        f"{LOGS}/{{stage}}_mlp_weights.log",
    conda:
        ENV
    container:
        config["container"]
    shell:
        "exec vlaflow save-mlp-weights {input:q} {output:q} > {log:q} 2>&1"


for name in STAGES:

    rule:
        name:
            name
        input:
            result(f"models/{name}"),


if "stage2" in STAGES:

    rule stage2_ckpt:
        input:
            result("models/stage2"),
