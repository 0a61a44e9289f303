# The evaluations the stage table names for each stage (by default: VQA benchmarks with the
# vision-language expert after every stage, robot control on held-out and simulator episodes after
# the stages whose model acts on robot data). Their settings are
# their own params: changing them reruns evaluation only.


rule eval_vqa:
    input:
        model=result("models/{vqa_stage}"),
        benchmarks=[
            f"{LMUDATA}/{name}.tsv"
            for name in config["evaluation"]["vqa"]["benchmarks"]
        ],
    output:
        report(
            directory(result("eval/{vqa_stage}/vqa")),
            patterns=["{name}_summary.json"],
            caption="../report/vqa.rst",
            category="VQA",
            subcategory="{vqa_stage}",
        ),
    log:
        f"{LOGS}/eval_vqa_{{vqa_stage}}.log",
    benchmark:
        f"{BENCHMARKS}/eval_vqa_{{vqa_stage}}.tsv"
    conda:
        ENV
    container:
        config["container"]
    threads: HEAVY_THREADS
    resources:
        gpu=1,
    params:
        benchmarks=config["evaluation"]["vqa"]["benchmarks"],
        lmudata=lambda w, input: os.path.dirname(input.benchmarks[0]),
        options=lambda w: cli_options(
            **{
                key: config["evaluation"]["vqa"][key]
                for key in ("batch_size", "max_new_tokens", "limit")
            },
            kinds=[
                f"{name}={kind}"
                for name, kind in config["evaluation"]["vqa"]["kinds"].items()
            ]
            or None,
        ),
    shell:
        "exec vlaflow eval vqa --model {input.model:q} --benchmarks {params.benchmarks:q} "
        "--lmudata {params.lmudata:q} --out {output:q} {params.options:q} > {log:q} 2>&1"


rule eval_robot:
    input:
        model=result("models/{robot_stage}"),
        data=lambda w: embedded_data(w.robot_stage),
    output:
        report(
            directory(result("eval/{robot_stage}/robot")),
            patterns=["{name}.json", "{name}.gif"],
            caption="../report/robot.rst",
            category="Robot control",
            subcategory="{robot_stage}",
        ),
    log:
        f"{LOGS}/eval_robot_{{robot_stage}}.log",
    benchmark:
        f"{BENCHMARKS}/eval_robot_{{robot_stage}}.tsv"
    conda:
        ENV
    container:
        config["container"]
    threads: HEAVY_THREADS
    resources:
        gpu=1,
    params:
        options=lambda w: cli_options(
            **{
                key: config["evaluation"]["robot"][key]
                for key in (
                    "split",
                    "episodes",
                    "seed",
                    "max_steps",
                    "limit",
                    "query_every",
                    "video_size",
                )
            },
            temporal_ensemble=config["evaluation"]["robot"]["temporal_ensemble"]
            or None,
        ),
    shell:
        "exec vlaflow eval robot --model {input.model:q} --out {output:q} {params.options:q} > {log:q} 2>&1"
