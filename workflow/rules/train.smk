# VLM-only training (when the config has a `vlm` stage), stage 1 and stage 2. Each keeps its
# resumable checkpoints in results/work/<stage>, outside the declared output: a retried or rerun
# job continues from its last checkpoint, and the model folder appears only when training ends.
# `exec`: the job's signals (a scheduler's SIGTERM) reach the launcher or trainer, not only the
# shell. The launch prefix is built from the schema's enum and integers alone; every other value
# is quoted.
TRAIN = (
    "exec {params.launch} --config {params.config:q} --stage {params.stage:q} --init {input.init:q} "
    "{params.mlp:q} --workdir {params.workdir:q} --out {output:q} > {log:q} 2>&1"
)


if "vlm" in STAGES:

    rule vlm:
        input:
            **train_inputs("vlm"),
        output:
            directory(result("models/vlm")),
        log:
            f"{LOGS}/vlm.log",
        benchmark:
            f"{BENCHMARKS}/vlm.tsv"
        retries: 2
        conda:
            ENV
        container:
            config["container"]
        threads: HEAVY_THREADS
        resources:
            **launch_resources(),
        params:
            **train_params("vlm"),
        shell:
            TRAIN

    rule vlm_mlp_weights:
        input:
            rules.vlm.output,
        output:
            result("vlm_mlp_weights.safetensors"),
        log:
            f"{LOGS}/vlm_mlp_weights.log",
        conda:
            ENV
        container:
            config["container"]
        shell:
            "exec vlaflow save-mlp-weights {input:q} {output:q} > {log:q} 2>&1"


rule stage1:
    input:
        **train_inputs("stage1"),
    output:
        directory(result("models/stage1")),
    log:
        f"{LOGS}/stage1.log",
    benchmark:
        f"{BENCHMARKS}/stage1.tsv"
    retries: 2
    conda:
        ENV
    container:
        config["container"]
    threads: HEAVY_THREADS
    resources:
        **launch_resources(),
    params:
        **train_params("stage1"),
    shell:
        TRAIN


rule stage2:
    input:
        **train_inputs("stage2"),
    output:
        directory(result("models/stage2")),
    log:
        f"{LOGS}/stage2.log",
    benchmark:
        f"{BENCHMARKS}/stage2.tsv"
    retries: 2
    conda:
        ENV
    container:
        config["container"]
    threads: HEAVY_THREADS
    resources:
        **launch_resources(),
    params:
        **train_params("stage2"),
    shell:
        TRAIN


rule stage2_ckpt:
    input:
        rules.stage2.output,
