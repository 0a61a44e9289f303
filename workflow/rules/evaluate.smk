# VQA benchmarks with the vision-language expert after every stage; robot control (held-out
# episodes, simulator episodes) after the stages that trained on robot data. Their settings are
# their own params: changing them reruns evaluation only.


rule eval_vqa:
    input:
        model=result("models/{stage}"),
        benchmarks=[
            f"{LMUDATA}/{name}.tsv"
            for name in config["evaluation"]["vqa"]["benchmarks"]
        ],
    output:
        directory(result("eval/{stage}/vqa")),
    log:
        f"{LOGS}/eval_vqa_{{stage}}.log",
    benchmark:
        f"{BENCHMARKS}/eval_vqa_{{stage}}.tsv"
    conda:
        ENV
    container:
        config["container"]
    threads: HEAVY_THREADS
    resources:
        gpu=1,
    params:
        benchmarks=" ".join(config["evaluation"]["vqa"]["benchmarks"]),
        lmudata=lambda w, input: os.path.dirname(input.benchmarks[0]),
        options=lambda w: (
            f"--batch-size {config['evaluation']['vqa']['batch_size']} "
            f"--max-new-tokens {config['evaluation']['vqa']['max_new_tokens']}"
            + (
                f" --limit {config['evaluation']['vqa']['limit']}"
                if config["evaluation"]["vqa"]["limit"]
                else ""
            )
        ),
    shell:
        "vlaflow eval vqa --model {input.model} --benchmarks {params.benchmarks} --lmudata {params.lmudata} "
        "--out {output} {params.options} > {log} 2>&1"


rule eval_robot:
    input:
        model=result("models/{robot_stage}"),
        data=lambda w: embedded_data(w.robot_stage),
    output:
        directory(result("eval/{robot_stage}/robot")),
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
        options=lambda w: " ".join(
            [
                f"--split {config['evaluation']['robot']['split']}",
                f"--episodes {config['evaluation']['robot']['episodes']}",
                f"--seed {config['evaluation']['robot']['seed']}",
                f"--max-steps {config['evaluation']['robot']['max_steps']}",
                *(
                    [f"--limit {config['evaluation']['robot']['limit']}"]
                    if config["evaluation"]["robot"]["limit"]
                    else []
                ),
                *(
                    ["--temporal-ensemble"]
                    if config["evaluation"]["robot"]["temporal_ensemble"]
                    else []
                ),
            ]
        ),
    shell:
        "vlaflow eval robot --model {input.model} --out {output} {params.options} > {log} 2>&1"
