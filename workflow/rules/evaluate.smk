# Reference statistics (one job per feature extractor) and per-point metrics.


rule reference_stats:
    input:
        inputs("reference_stats"),
    output:
        out("reference_stats"),
    log:
        log("reference_stats"),
    benchmark:
        benchmark("reference_stats")
    params:
        fingerprint=fingerprint("reference_stats"),
        command=command("reference_stats"),
    threads: threads("reference_stats")
    resources:
        gpu=gpus("reference_stats"),
    conda:
        CONDA_ENV
    shell:
        SHELL


rule evaluate:
    input:
        inputs("evaluate"),
    output:
        out("evaluate"),
    log:
        log("evaluate"),
    benchmark:
        benchmark("evaluate")
    params:
        fingerprint=fingerprint("evaluate"),
        command=command("evaluate"),
    threads: threads("evaluate")
    resources:
        gpu=gpus("evaluate"),
    conda:
        CONDA_ENV
    shell:
        SHELL
