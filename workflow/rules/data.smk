# Data, tokenizer and tokens.


rule prepare_data:
    input:
        inputs("prepare_data"),
    output:
        out("prepare_data"),
    log:
        log("prepare_data"),
    params:
        file=PARAMS_FILE,
        fingerprint=fingerprint("prepare_data"),
    threads: threads("prepare_data")
    conda:
        CONDA_ENV
    shell:
        "arpg prepare-data --params {params.file:q} > {log:q} 2>&1"


rule train_tokenizer:
    input:
        inputs("train_tokenizer"),
    output:
        out("train_tokenizer"),
    log:
        log("train_tokenizer"),
    params:
        file=PARAMS_FILE,
        fingerprint=fingerprint("train_tokenizer"),
    threads: threads("train_tokenizer")
    resources:
        gpu=gpus("train_tokenizer"),
    conda:
        CONDA_ENV
    shell:
        "arpg train-tokenizer --params {params.file:q} > {log:q} 2>&1"


rule tokenize:
    input:
        inputs("tokenize"),
    output:
        out("tokenize"),
    log:
        log("tokenize"),
    params:
        file=PARAMS_FILE,
        fingerprint=fingerprint("tokenize"),
    threads: threads("tokenize")
    resources:
        gpu=gpus("tokenize"),
    conda:
        CONDA_ENV
    shell:
        "arpg tokenize --params {params.file:q} > {log:q} 2>&1"
