# One job per sweep point (arpg.sweeps.sweep_points): model, steps, cfg, order.
# sample.nproc > 1 shards the point across torchrun processes.


rule sample:
    input:
        inputs("sample"),
    output:
        out("sample"),
    log:
        log("sample"),
    benchmark:
        benchmark("sample")
    params:
        fingerprint=fingerprint("sample"),
        command=command("sample"),
    threads: threads("sample")
    resources:
        gpu=gpus("sample"),
    conda:
        CONDA_ENV
    shell:
        SHELL
