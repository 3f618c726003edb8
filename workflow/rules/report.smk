# Timing, zero-shot galleries and the generated report.


rule profile:
    input:
        inputs("profile"),
    output:
        out("profile"),
    log:
        log("profile"),
    params:
        file=PARAMS_FILE,
        fingerprint=fingerprint("profile"),
    threads: threads("profile")
    resources:
        gpu=gpus("profile"),
    conda:
        CONDA_ENV
    shell:
        "arpg profile --params {params.file:q} > {log:q} 2>&1"


rule gallery:
    input:
        inputs("gallery"),
    output:
        out("gallery"),
    log:
        log("gallery"),
    params:
        file=PARAMS_FILE,
        fingerprint=fingerprint("gallery"),
    threads: threads("gallery")
    resources:
        gpu=gpus("gallery"),
    conda:
        CONDA_ENV
    shell:
        "arpg gallery --params {params.file:q} > {log:q} 2>&1"


rule report:
    input:
        inputs("report"),
    output:
        out("report"),
    log:
        log("report"),
    params:
        file=PARAMS_FILE,
        fingerprint=fingerprint("report"),
    conda:
        CONDA_ENV
    shell:
        "arpg report --params {params.file:q} > {log:q} 2>&1"
