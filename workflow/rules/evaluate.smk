# Reference statistics (one job per feature extractor) and per-point metrics.


rule reference_stats:
    input:
        inputs("reference_stats"),
    output:
        out("reference_stats"),
    log:
        log("reference_stats"),
    params:
        file=PARAMS_FILE,
        fingerprint=fingerprint("reference_stats"),
    threads: threads("reference_stats")
    resources:
        gpu=gpus("reference_stats"),
    conda:
        CONDA_ENV
    shell:
        "arpg reference-stats --params {params.file:q} --extractor {wildcards.extractor} > {log:q} 2>&1"


rule evaluate:
    input:
        inputs("evaluate"),
    output:
        out("evaluate"),
    log:
        log("evaluate"),
    params:
        file=PARAMS_FILE,
        fingerprint=fingerprint("evaluate"),
    threads: threads("evaluate")
    resources:
        gpu=gpus("evaluate"),
    conda:
        CONDA_ENV
    shell:
        "arpg evaluate --params {params.file:q} --model {wildcards.model} --steps {wildcards.steps} --cfg {wildcards.cfg} --order {wildcards.order} > {log:q} 2>&1"
