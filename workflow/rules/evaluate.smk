# Reference statistics (one job per feature extractor) and per-point metrics.


rule reference_stats:
    input:
        inputs("reference_stats"),
    output:
        out("reference_stats"),
    log:
        log("reference_stats"),
    params:
        fingerprint=fingerprint("reference_stats"),
    threads: threads("reference_stats")
    resources:
        gpu=gpus("reference_stats"),
    conda:
        CONDA_ENV
    shell:
        "arpg reference-stats --extractor {wildcards.extractor} > {log:q} 2>&1"


rule evaluate:
    input:
        inputs("evaluate"),
    output:
        out("evaluate"),
    log:
        log("evaluate"),
    params:
        fingerprint=fingerprint("evaluate"),
    threads: threads("evaluate")
    resources:
        gpu=gpus("evaluate"),
    conda:
        CONDA_ENV
    shell:
        "arpg evaluate --model {wildcards.model} --steps {wildcards.steps} --cfg {wildcards.cfg} --order {wildcards.order} > {log:q} 2>&1"
