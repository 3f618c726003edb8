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
