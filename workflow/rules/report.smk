# One page on the run: the forgetting table, evaluations, loss curves and rollouts; also what
# `snakemake --report` shows.


def report_runs(w):
    runs = []
    for stage in STAGES:
        folders = [result(f"eval/{stage}/vqa")] + (
            [result(f"eval/{stage}/robot")] if stage in ROBOT_STAGES else []
        )
        runs.append(f"--run {stage} {result(f'models/{stage}')} " + " ".join(folders))
    return " ".join(runs)


rule report:
    input:
        models=expand(result("models/{stage}"), stage=STAGES),
        vqa=expand(result("eval/{stage}/vqa"), stage=STAGES),
        robot=expand(result("eval/{stage}/robot"), stage=ROBOT_STAGES),
    output:
        report(directory(result("report")), htmlindex="report.html", category="vlaflow"),
    log:
        f"{LOGS}/report.log",
    conda:
        ENV
    container:
        config["container"]
    params:
        runs=report_runs,
    shell:
        "vlaflow report --out {output} --title 'vlaflow: {CONFIG_FILE}' {params.runs} > {log} 2>&1"
