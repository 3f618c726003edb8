"""`arpg tokenize`: encode the prepared images into token grids; reconstruction and codebook metrics."""

from __future__ import annotations


def configure(parser) -> None:
    parser.epilog = ("Writes tokens/{train,test[,train_flip]}_tokens.npy + labels, tokens/metrics.json and "
                     "tokens/reconstructions.png. What to tokenize comes from the `tokenizer:` section.")


def run(args, params) -> None:
    from arpg.config import unrecorded
    from arpg.engine.tokenizer import tokenize_dataset
    from arpg.tracking import stage_run

    layout = params.layout
    with stage_run(params, "tokenize", run_params={"seed": unrecorded(params)["seed"], "model": "vq"}) as tracker:
        m = tokenize_dataset(params, tracker)
    h, w = m["token_grid"]
    print(f"token grids {h}x{w} ({m['token_dtype']}) in {layout.tokens_dir}")
    print(f"test reconstruction ({m['eval_images']} images): PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}")
    print(f"codebook (train tokens): {m['codes_used']}/{m['codebook_size']} codes used ({m['codebook_usage']:.1%}), "
          f"perplexity {m['codebook_perplexity']:.1f}")
    print(f"wrote {layout.tokenize_metrics} and {layout.reconstructions}")
