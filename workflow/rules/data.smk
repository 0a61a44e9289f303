# The embedded default's data (easy-vqa, ALOHA simulator demonstrations) and the check of every
# dataset the config uses, which runs before any training.
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
            options=lambda w: (
                f"--train-images {embedded('easy_vqa')['train_images']} "
                f"--benchmark-questions {embedded('easy_vqa')['benchmark_questions']} "
                f"--multiple-choice {embedded('easy_vqa')['multiple_choice']} --seed {embedded('easy_vqa')['seed']} "
                f"--text-only {embedded('easy_vqa')['text_only']}"
                + (
                    " --image-sizes "
                    + " ".join(
                        f"{height}x{width}"
                        for height, width in embedded("easy_vqa")["image_sizes"]
                    )
                    if embedded("easy_vqa")["image_sizes"]
                    else ""
                )
            ),
        shell:
            "vlaflow data easy-vqa {output.train} {output.benchmark} {params.options} > {log} 2>&1"


if embedded("aloha_demos"):

    rule aloha_demos:
        output:
            directory(f"{DATA_ROOT}/{embedded('aloha_demos')['dataset']}"),
        log:
            f"{LOGS}/aloha_demos.log",
        benchmark:
            f"{BENCHMARKS}/aloha_demos.tsv"
        conda:
            ENV
        container:
            config["container"]
        threads: HEAVY_THREADS
        params:
            options=lambda w: (
                f"--episodes {embedded('aloha_demos')['episodes']} --height {embedded('aloha_demos')['height']} "
                f"--width {embedded('aloha_demos')['width']} --seed {embedded('aloha_demos')['seed']} "
                + (
                    "--shadows"
                    if embedded("aloha_demos")["shadows"]
                    else "--no-shadows"
                )
            ),
        shell:
            "vlaflow data aloha-demos {output} {params.options} --workers {threads} > {log} 2>&1"


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
        "vlaflow data check --config {params.config} --model {input.model} > {output} 2> {log}"
