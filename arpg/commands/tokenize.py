"""`arpg tokenize`: encode the prepared images into token grids; reconstruction and codebook metrics."""

from __future__ import annotations

import time

from arpg.stages import COMPUTE_KEYS, VQ_KEYS, Ctx, Job, Rule, gpu_count, key_list, log_path, needs_tokens


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    lay, tok = ctx.layout, ctx.params["tokenizer"]
    inputs = [str(lay.tokenizer_checkpoint)]
    inputs += [str(p) for split in ("train", "test") for p in (lay.images(split), lay.labels(split))]
    outputs = [str(p) for split in ("train", "test") for p in (lay.tokens(split), lay.token_labels(split))]
    if tok["tokenize_flip"]:
        outputs += [str(lay.tokens("train_flip")), str(lay.token_labels("train_flip"))]
    outputs += [str(lay.tokenize_metrics), str(lay.reconstructions)]
    return Job("tokenize", {}, ("tokenize",), tuple(inputs), tuple(outputs),
               key_list(COMPUTE_KEYS, VQ_KEYS, "tokenizer.tokenize_flip", "tokenizer.eval_images"),
               threads=ctx.params["threads"], gpus=gpu_count(ctx.params), log=log_path(ctx, "tokenize", w, ()))


RULE = Rule("tokenize", (), _job, lambda p: [{}] if needs_tokens(p) else [],
            desc="Encode the images into token grids and measure the tokenizer's reconstructions.")


def configure(parser) -> None:
    parser.epilog = ("Writes tokens/{train,test[,train_flip]}_tokens.npy + labels, tokens/metrics.json and "
                     "tokens/reconstructions.png. What to tokenize comes from the `tokenizer:` section.")


def run(args, params) -> None:
    from arpg.config import unrecorded
    from arpg.tracking import stage_run

    layout = params.layout
    with stage_run(params, "tokenize", run_params={"seed": unrecorded(params)["seed"], "model": "vq"}) as tracker:
        m = tokenize_dataset(params, tracker)
    h, w = m["token_grid"]
    print(f"token grids {h}x{w} ({m['token_dtype']}) in {layout.tokens_dir}")
    band = m["intervals"]["psnr"]
    print(f"test reconstruction ({m['eval_images']} images): PSNR {m['psnr']:.2f} dB "
          f"(95% [{band['lo']:.2f}, {band['hi']:.2f}]), SSIM {m['ssim']:.4f}")
    print(f"codebook (train tokens): {m['codes_used']}/{m['codebook_size']} codes used ({m['codebook_usage']:.1%}), "
          f"perplexity {m['codebook_perplexity']:.1f}")
    print(f"wrote {layout.tokenize_metrics} and {layout.reconstructions}")


TOKENIZE_BATCH = 100  # larger batches (>32 MB activations) make glibc mmap/munmap every batch (3x the time)


def tokenize_dataset(params, run=None, batch_size: int = TOKENIZE_BATCH, grid_images: int = 32) -> dict:
    """Encode train / test (and the flipped train set), write tokens + labels, metrics and a grid PNG.

    The metrics file holds results only; encoding times go to the log and MLflow."""
    import numpy as np

    from arpg.data.arrays import load_images_NCHW, load_labels
    from arpg.engine.bootstrap import mean_interval
    from arpg.engine.image_metrics import psnr, ssim
    from arpg.engine.tokenizer import codebook_stats, encode_pixels, reconstruct_pixels, save_grid, token_dtype
    from arpg.models.vq import TRAIN_COMMAND, VQConfig, load_tokenizer
    from arpg.utils import atomic_save_npy, resolve_device, write_json

    layout = params.layout
    tok = params["tokenizer"]
    device = resolve_device(params["device"])
    vq_cfg = VQConfig.from_params(params)
    model = load_tokenizer(layout.tokenizer_checkpoint, vq_cfg, written_by=TRAIN_COMMAND).to(device)
    dtype = token_dtype(vq_cfg.codebook_size)
    timings, stats = {}, {}
    splits = [("train", "train", False), ("test", "test", False)]
    if tok["tokenize_flip"]:
        splits.append(("train_flip", "train", True))
    pixels_by_split = {}
    for name, source, flip in splits:
        if source not in pixels_by_split:
            pixels_by_split[source] = load_images_NCHW(layout, source, vq_cfg.in_channels)
        t0 = time.monotonic()
        tokens_Nhw = encode_pixels(model, pixels_by_split[source], batch_size, device, flip=flip)
        timings[f"{name}_seconds"] = time.monotonic() - t0
        print(f"encoded {name}: {timings[name + '_seconds']:.1f} s")
        atomic_save_npy(layout.tokens(name), tokens_Nhw.numpy().astype(dtype))
        # train_flip gets its own copy of the labels, so every split reads the same way
        atomic_save_npy(layout.token_labels(name), np.asarray(load_labels(layout, source), dtype=np.int64))
        if name == "train":
            stats = codebook_stats(tokens_Nhw, vq_cfg.codebook_size)

    test = pixels_by_split["test"][:tok["eval_images"]]
    recon = reconstruct_pixels(model, test, batch_size, device)
    psnr_N, ssim_N = psnr(recon, test), ssim(recon, test)
    save_grid(test[:grid_images], recon[:grid_images], layout.reconstructions)
    psnr_N = psnr_N.clamp(max=100)  # a perfect image (inf dB) counts as 100 dB
    metrics = {
        "psnr": psnr_N.mean().item(),
        "ssim": ssim_N.mean().item(),
        "eval_images": int(test.shape[0]),
        "codebook_usage": stats["usage"], "codebook_perplexity": stats["perplexity"],
        "codes_used": stats["codes_used"], "codebook_size": vq_cfg.codebook_size,
        "token_grid": list(tokens_Nhw.shape[1:]), "token_dtype": np.dtype(dtype).name,
        # the eval images as a sample of the test split: normal intervals of the means
        "intervals": {"psnr": mean_interval(psnr_N)[1], "ssim": mean_interval(ssim_N)[1]},
    }
    write_json(layout.tokenize_metrics, metrics)
    if run is not None:
        run.log_metrics({k: v for k, v in (metrics | timings).items() if isinstance(v, (int, float))})
        run.log_artifact(layout.reconstructions)
        run.log_artifact(layout.tokenize_metrics)
    return metrics
