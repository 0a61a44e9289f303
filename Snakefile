# vlaflow: ChatVLA's two-stage recipe as a workflow. The rules live in workflow/rules/, one file
# per phase; config/README.md documents the configuration.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless --configfile names the run's config: that one then stands alone,
# rather than being merged into the default's keys (its stages and embedded data).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# What `snakemake --report report.zip` opens with; each result it shows has its own caption.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
