# Data, tokenizer and tokens.


rule prepare_data:
    input:
        inputs("prepare_data"),
    output:
        out("prepare_data"),
    log:
        log("prepare_data"),
    benchmark:
        benchmark("prepare_data")
    params:
        fingerprint=fingerprint("prepare_data"),
        command=command("prepare_data"),
    threads: threads("prepare_data")
    conda:
        CONDA_ENV
    shell:
        SHELL


rule train_tokenizer:
    input:
        inputs("train_tokenizer"),
    output:
        out("train_tokenizer"),
    log:
        log("train_tokenizer"),
    benchmark:
        benchmark("train_tokenizer")
    params:
        fingerprint=fingerprint("train_tokenizer"),
        command=command("train_tokenizer"),
    threads: threads("train_tokenizer")
    resources:
        gpu=gpus("train_tokenizer"),
    conda:
        CONDA_ENV
    shell:
        SHELL


rule tokenize:
    input:
        inputs("tokenize"),
    output:
        out("tokenize"),
    log:
        log("tokenize"),
    benchmark:
        benchmark("tokenize")
    params:
        fingerprint=fingerprint("tokenize"),
        command=command("tokenize"),
    threads: threads("tokenize")
    resources:
        gpu=gpus("tokenize"),
    conda:
        CONDA_ENV
    shell:
        SHELL
