# The embedded default's data (easy-vqa, ALOHA simulator demonstrations, one set per dataset and
# task) and the check of every dataset the config uses, which runs before any training.
LMUDATA = config["evaluation"]["vqa"]["lmudata"]


if embedded("easy_vqa"):

    rule easy_vqa:
        output:
            train=directory(f"{DATA_ROOT}/{embedded('easy_vqa')['dataset']}"),
            benchmark=f"{LMUDATA}/EasyVQA.tsv",
        log:
            f"{LOGS}/easy_vqa.log",
        conda:
            ENV
        container:
            config["container"]
        params:
            options=lambda w: cli_options(
                train_images=embedded("easy_vqa")["train_images"],
                benchmark_questions=embedded("easy_vqa")["benchmark_questions"],
                multiple_choice=embedded("easy_vqa")["multiple_choice"],
                seed=embedded("easy_vqa")["seed"],
                text_only=embedded("easy_vqa")["text_only"],
                image_sizes=[
                    f"{height}x{width}"
                    for height, width in embedded("easy_vqa")["image_sizes"] or []
                ]
                or None,
            ),
        shell:
            "exec vlaflow data easy-vqa {output.train:q} {output.benchmark:q} {params.options:q} > {log:q} 2>&1"


if sim_datasets():

    rule aloha_demos:
        output:
            directory(f"{DATA_ROOT}/{{sim_dataset}}"),
        log:
            f"{LOGS}/aloha_demos_{{sim_dataset}}.log",
        benchmark:
            f"{BENCHMARKS}/aloha_demos_{{sim_dataset}}.tsv"
        wildcard_constraints:
            sim_dataset="|".join(re.escape(name) for name in sim_datasets()),
        conda:
            ENV
        container:
            config["container"]
        threads: DEMO_THREADS
        params:
            options=lambda w: cli_options(
                task=sim_datasets()[w.sim_dataset],
                **{
                    key: embedded("aloha_demos")[key]
                    for key in ("episodes", "height", "width", "seed", "shadows")
                },
            ),
        shell:
            "exec vlaflow data aloha-demos {output:q} {params.options:q} --workers {threads} > {log:q} 2>&1"


rule data_check:
    input:
        data=[folder for stage in STAGES for folder in embedded_data(stage)],
        model=rules.vla_config.output,
    output:
        result("data_check.txt"),
    log:
        f"{LOGS}/data_check.log",
    conda:
        ENV
    container:
        config["container"]
    params:
        settings=lambda w: data_fingerprint(),
        config=CONFIG_FILE,
    shell:
        "exec vlaflow data check --config {params.config:q} --model {input.model:q} > {output:q} 2> {log:q}"
