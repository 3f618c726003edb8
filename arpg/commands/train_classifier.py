"""`arpg train-classifier`: the small CNN behind the `classifier` extractor (IS / FID / accuracy).

Writes the checkpoint and a metrics JSON with the test accuracy and a sanity row:
the evaluate path run on real data (test split, half vs half), which is what a
perfect generator would score.
"""

from __future__ import annotations

from arpg.stages import COMPUTE_KEYS, EVAL_METRIC_KEYS, Ctx, Job, Rule, extractors_of, gpu_count, key_list, log_path


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    lay = ctx.layout
    inputs = tuple(str(p) for split in ("train", "test") for p in (lay.images(split), lay.labels(split)))
    return Job("train_classifier", {}, ("train-classifier",), inputs,
               (str(lay.classifier_checkpoint), str(lay.classifier_metrics)),
               key_list(COMPUTE_KEYS, "classifier", "seed", "data.channels", "data.num_classes", "data.resolution",
                        EVAL_METRIC_KEYS),  # + the sanity row: real test halves through the evaluate path
               threads=ctx.params["threads"], gpus=gpu_count(ctx.params), log=log_path(ctx, "train_classifier", w, ()))


RULE = Rule("train_classifier", (), _job, lambda p: [{}] if "classifier" in extractors_of(p) else [],
            desc="Train the small CNN whose features and softmax the classifier metrics use.")


def configure(parser) -> None:
    parser.epilog = "Architecture and budget come from the `classifier:` section of the params file."


def run(args, params) -> None:
    import time

    import numpy as np
    import torch

    from arpg.config import unrecorded
    from arpg.data.arrays import load_images, load_labels
    from arpg.engine.classifier import (ClassifierTrainConfig, accuracy, model_config_from_params, predict,
                                        train_classifier)
    from arpg.engine.bootstrap import mean_interval
    from arpg.engine.evaluate import compute_reference
    from arpg.engine.metrics import EvalConfig, compute_metrics
    from arpg.models.classifier import save_classifier
    from arpg.tracking import stage_run
    from arpg.utils import make_generator, resolve_device, write_json

    layout = params.layout
    device = resolve_device(params["device"])
    train_cfg = ClassifierTrainConfig.from_params(params)
    model_cfg = model_config_from_params(params)
    plain = unrecorded(params)  # MLflow labels
    run_params = {"seed": plain["seed"], **{f"classifier.{k}": v for k, v in plain["classifier"].items()}}
    # the run is open before any work (reading the images), so any failure ends it FAILED
    with stage_run(params, "train-classifier", run_params=run_params) as run:
        train_x, train_y = load_images(layout, "train"), load_labels(layout, "train")
        test_x, test_y = load_images(layout, "test"), load_labels(layout, "test")
        start = time.monotonic()
        model, stats = train_classifier(train_x, train_y, model_cfg, train_cfg, device, log=run.log_metrics)
        logits_NK, _ = predict(model, test_x, params["evaluate"]["batch_size"], device)
        stats["test_accuracy"] = accuracy(logits_NK, test_y)
        correct_N = logits_NK.argmax(dim=1).numpy() == np.asarray(test_y)
        stats["intervals"] = {"test_accuracy": mean_interval(correct_N)[1]}  # the test images as a sample
        seconds = time.monotonic() - start  # the log and MLflow only: the metrics file holds results
        save_classifier(model, layout.classifier_checkpoint)

        # Sanity row: real test images through the same evaluate path (half A as "samples"
        # with their labels, half B as the reference).
        order = torch.randperm(len(test_x), generator=make_generator(params["seed"])).numpy()
        half_a, half_b = order[: len(order) // 2], order[len(order) // 2:]
        eval_cfg = EvalConfig.from_params(params)
        ckpt = layout.classifier_checkpoint
        reference = compute_reference(test_x[half_b], "classifier", ckpt, eval_cfg.batch_size, device)
        stats["real_test_halves"] = compute_metrics(test_x[half_a], test_y[half_a], reference, "classifier",
                                                    ckpt, eval_cfg, device)
        write_json(layout.classifier_metrics, stats)
        run.log_metrics({k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
                        | {"train_seconds": seconds})
        run.log_metrics({f"real_{k}": v for k, v in stats["real_test_halves"].items()})
        run.log_artifact(layout.classifier_metrics)
    real = stats["real_test_halves"]
    band = stats["intervals"]["test_accuracy"]
    print(f"classifier: test accuracy {stats['test_accuracy']:.4f} (95% [{band['lo']:.4f}, {band['hi']:.4f}]) "
          f"after {stats['steps']} steps "
          f"({stats['epochs']} epochs) in {seconds:.1f} s")
    print(f"real test halves: accuracy_classifier {real['accuracy_classifier']:.4f}, "
          f"isc_classifier {real['isc_classifier']:.3f}, fid_classifier {real['fid_classifier']:.4f}")
    print(f"wrote {layout.classifier_checkpoint} and {layout.classifier_metrics}")
