# Timing, zero-shot galleries and measurements, and the generated report.


rule profile:
    input:
        inputs("profile"),
    output:
        out("profile"),
    log:
        log("profile"),
    benchmark:
        benchmark("profile")
    params:
        fingerprint=fingerprint("profile"),
        command=command("profile"),
    threads: threads("profile")
    resources:
        gpu=gpus("profile"),
    conda:
        CONDA_ENV
    shell:
        SHELL


rule gallery:
    input:
        inputs("gallery"),
    output:
        out("gallery"),
    log:
        log("gallery"),
    benchmark:
        benchmark("gallery")
    params:
        fingerprint=fingerprint("gallery"),
        command=command("gallery"),
    threads: threads("gallery")
    resources:
        gpu=gpus("gallery"),
    conda:
        CONDA_ENV
    shell:
        SHELL


# One job per task: the longest jobs of the sweep phase (minutes each), so they start first and the
# short sample and evaluate jobs fill the cores at the end instead of one long job running alone.
rule zero_shot:
    priority: 10
    input:
        inputs("zero_shot"),
    output:
        out("zero_shot"),
    log:
        log("zero_shot"),
    benchmark:
        benchmark("zero_shot")
    params:
        fingerprint=fingerprint("zero_shot"),
        command=command("zero_shot"),
    threads: threads("zero_shot")
    resources:
        gpu=gpus("zero_shot"),
    conda:
        CONDA_ENV
    shell:
        SHELL


# report.dir is marked for `snakemake --report`: every table and figure in it, filed by category
# with its caption (arpg/report_catalog.py), so that page is a self-contained results page.
rule report:
    input:
        inputs("report"),
    output:
        out("report"),
        report(
            directory(REPORT_DIR),
            patterns=REPORT_PATTERNS,
            caption="../report/result.rst",
            category=report_category,
            subcategory=report_subcategory,
            labels=report_labels,
        ),
    log:
        log("report"),
    benchmark:
        benchmark("report")
    params:
        fingerprint=fingerprint("report"),
        command=command("report"),
    conda:
        CONDA_ENV
    shell:
        SHELL
