# Generators and the evaluation classifier. Training runs under torchrun when
# train.nproc > 1 (the command then starts with the torchrun prefix).


rule train_classifier:
    input:
        inputs("train_classifier"),
    output:
        out("train_classifier"),
    log:
        log("train_classifier"),
    params:
        fingerprint=fingerprint("train_classifier"),
        command=command("train_classifier"),
    threads: threads("train_classifier")
    resources:
        gpu=gpus("train_classifier"),
    conda:
        CONDA_ENV
    shell:
        "{params.command} > {log:q} 2>&1"


rule train_arpg:
    input:
        inputs("train_arpg"),
    output:
        out("train_arpg"),
    log:
        log("train_arpg"),
    params:
        fingerprint=fingerprint("train_arpg"),
        command=command("train_arpg"),
    threads: threads("train_arpg")
    resources:
        gpu=gpus("train_arpg"),
    conda:
        CONDA_ENV
    shell:
        "{params.command} > {log:q} 2>&1"


rule train_raster:
    input:
        inputs("train_raster"),
    output:
        out("train_raster"),
    log:
        log("train_raster"),
    params:
        fingerprint=fingerprint("train_raster"),
        command=command("train_raster"),
    threads: threads("train_raster")
    resources:
        gpu=gpus("train_raster"),
    conda:
        CONDA_ENV
    shell:
        "{params.command} > {log:q} 2>&1"
