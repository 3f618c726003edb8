# Every stage but the report, one rule each, made from its declaration: RULE in
# arpg/commands/<stage>.py (arpg.pipeline.STAGES lists them in DAG order). Its paths, command,
# fingerprint, threads, GPUs and priority all come from there; nothing here restates a stage.
# The report's rule (report.smk) adds the `snakemake --report` markup of its folder.

for _stage in PIPE.RULES.values():
    if _stage.name == "report":
        continue

    rule:
        name:
            _stage.name
        priority: _stage.priority
        input:
            inputs(_stage.name),
        output:
            out(_stage.name),
        log:
            log(_stage.name),
        benchmark:
            benchmark(_stage.name)
        params:
            fingerprint=fingerprint(_stage.name),
            command=command(_stage.name),
        threads: threads(_stage.name)
        resources:
            gpu=gpus(_stage.name),
        conda:
            CONDA_ENV
        shell:
            SHELL
