# Generators and the evaluation classifier. Training runs under torchrun when
# train.nproc > 1 (the command then starts with the torchrun prefix).


rule train_classifier:
    input:
        inputs("train_classifier"),
    output:
        out("train_classifier"),
    log:
        log("train_classifier"),
    benchmark:
        benchmark("train_classifier")
    params:
        fingerprint=fingerprint("train_classifier"),
        command=command("train_classifier"),
    threads: threads("train_classifier")
    resources:
        gpu=gpus("train_classifier"),
    conda:
        CONDA_ENV
    shell:
        SHELL


# One job per decoder of arpg/decoders.py (the `model` wildcard): a registered decoder is in the
# DAG without a rule of its own.
rule train:
    input:
        inputs("train"),
    output:
        out("train"),
    log:
        log("train"),
    benchmark:
        benchmark("train")
    params:
        fingerprint=fingerprint("train"),
        command=command("train"),
    threads: threads("train")
    resources:
        gpu=gpus("train"),
    conda:
        CONDA_ENV
    shell:
        SHELL
