"""`arpg train-tokenizer`: train the VQ tokenizer, or import tokenizer.pretrained (a LlamaGen checkpoint)."""

from __future__ import annotations


def configure(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (logs still go to MLflow)")
    parser.epilog = ("Sizes, losses and budgets come from the `tokenizer:` section of the params file. "
                     "An interrupted run resumes from its last checkpoint when re-run.")


def run(args, params) -> None:
    import time

    from arpg.config import unrecorded
    from arpg.engine.tokenizer import import_pretrained, train_tokenizer
    from arpg.tracking import stage_run

    tok = params["tokenizer"]
    layout = params.layout
    run_params = ({f"tokenizer.{k}": v for k, v in unrecorded(params)["tokenizer"].items()}  # MLflow labels
                  | {"seed": unrecorded(params)["seed"], "model": "vq"})
    with stage_run(params, "train-tokenizer", run_params=run_params) as tracker:
        start = time.monotonic()
        if tok["pretrained"]:
            summary = import_pretrained(params)
            print(f"loaded {summary['pretrained']} strictly ({summary['parameters']:,} parameters); "
                  f"wrote {layout.tokenizer_checkpoint}")
        else:
            summary = train_tokenizer(params, tracker, progress=not args.no_progress)
            final = summary["final"]
            print(f"trained {summary['steps']} steps in {time.monotonic() - start:.1f} s; last window: loss {final.get('loss', float('nan')):.4f}, "
                  f"batch PSNR {final.get('batch_psnr', float('nan')):.2f} dB, "
                  f"codes used {final.get('usage_window', float('nan')):.1%}")
            print(f"wrote {layout.tokenizer_checkpoint}")
        tracker.log_metrics({"train_steps": summary["steps"], "train_minutes": (time.monotonic() - start) / 60})
        tracker.log_artifact(layout.tokenizer_metrics)
