# The arpg study as a Snakemake workflow: every rule is one `arpg` subcommand.
#
#   snakemake --cores all                                    # the default study (params.yaml)
#   snakemake --cores all --config params=configs/smoke.yaml # another params file
#   snakemake -n                                             # what would run
#
# Each stage is declared once, beside its code, in arpg/commands/<stage>.py; its rule
# (workflow/rules/stages.smk) and its dvc.yaml stage (`arpg export-dvc`) are made from that
# declaration through arpg/pipeline.py.

report: "workflow/report/workflow.rst"  # the --report page's description


include: "workflow/rules/common.smk"
include: "workflow/rules/stages.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        PIPE.pattern(PARAMS, "report").outputs,
    default_target: True
