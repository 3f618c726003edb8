# Timing, zero-shot galleries and measurements, and the generated report.


rule profile:
    input:
        inputs("profile"),
    output:
        out("profile"),
    log:
        log("profile"),
    params:
        fingerprint=fingerprint("profile"),
        command=command("profile"),
    threads: threads("profile")
    resources:
        gpu=gpus("profile"),
    conda:
        CONDA_ENV
    shell:
        "{params.command} > {log:q} 2>&1"


rule gallery:
    input:
        inputs("gallery"),
    output:
        out("gallery"),
    log:
        log("gallery"),
    params:
        fingerprint=fingerprint("gallery"),
        command=command("gallery"),
    threads: threads("gallery")
    resources:
        gpu=gpus("gallery"),
    conda:
        CONDA_ENV
    shell:
        "{params.command} > {log:q} 2>&1"


rule zero_shot:
    input:
        inputs("zero_shot"),
    output:
        out("zero_shot"),
    log:
        log("zero_shot"),
    params:
        fingerprint=fingerprint("zero_shot"),
        command=command("zero_shot"),
    threads: threads("zero_shot")
    resources:
        gpu=gpus("zero_shot"),
    conda:
        CONDA_ENV
    shell:
        "{params.command} > {log:q} 2>&1"


rule report:
    input:
        inputs("report"),
    output:
        out("report"),
    log:
        log("report"),
    params:
        fingerprint=fingerprint("report"),
        command=command("report"),
    conda:
        CONDA_ENV
    shell:
        "{params.command} > {log:q} 2>&1"
