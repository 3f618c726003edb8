# The arpg study as a Snakemake workflow: every rule is one `arpg` subcommand.
#
#   snakemake --cores all                                    # the default study (params.yaml)
#   snakemake --cores all --config params=configs/smoke.yaml # another params file
#   snakemake -n                                             # what would run
#
# Paths, inputs and params fingerprints come from arpg/pipeline.py (the same
# source as dvc.yaml, see `arpg export-dvc`). Rules live in workflow/rules/.

report: "workflow/report/workflow.rst"  # the --report page's description


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        PIPE.pattern(PARAMS, "report").outputs,
    default_target: True
