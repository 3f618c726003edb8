# Timing, zero-shot galleries and the generated report.


rule profile:
    input:
        inputs("profile"),
    output:
        out("profile"),
    log:
        log("profile"),
    params:
        fingerprint=fingerprint("profile"),
    threads: threads("profile")
    resources:
        gpu=gpus("profile"),
    conda:
        CONDA_ENV
    shell:
        "arpg profile > {log:q} 2>&1"


rule gallery:
    input:
        inputs("gallery"),
    output:
        out("gallery"),
    log:
        log("gallery"),
    params:
        fingerprint=fingerprint("gallery"),
    threads: threads("gallery")
    resources:
        gpu=gpus("gallery"),
    conda:
        CONDA_ENV
    shell:
        "arpg gallery > {log:q} 2>&1"


rule report:
    input:
        inputs("report"),
    output:
        out("report"),
    log:
        log("report"),
    params:
        fingerprint=fingerprint("report"),
    conda:
        CONDA_ENV
    shell:
        "arpg report > {log:q} 2>&1"
