# One page on the run: the forgetting table, evaluations, loss curves and rollouts; also what
# `snakemake --report` shows.


rule report:
    input:
        models=expand(result("models/{stage}"), stage=STAGES),
        vqa=expand(result("eval/{stage}/vqa"), stage=VQA_STAGES),
        robot=expand(result("eval/{stage}/robot"), stage=ROBOT_STAGES),
    output:
        report(
            directory(result("report")),
            htmlindex="report.html",
            caption="../report/report.rst",
            category="Report",
        ),
    log:
        f"{LOGS}/report.log",
    conda:
        ENV
    container:
        config["container"]
    params:
        runs=report_runs,
        title=f"vlaflow: {CONFIG_SOURCE}",
    shell:
        "exec vlaflow report --out {output:q} --title {params.title:q} {params.runs:q} > {log:q} 2>&1"
