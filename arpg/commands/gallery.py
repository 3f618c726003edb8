"""`arpg gallery`: zero-shot inpainting, outpainting and resolution expansion with the trained ARPG
(the zero-shot decoder of arpg/decoders.py).

Test images are tokenized with the VQ tokenizer; for each task in `gallery.tasks`
one PNG (a row per image, its class name on the left: input | input with the unknown cells grey |
outputs, labelled above; every image at least MIN_TILE_PX on screen)
and one JSON describing what was done (images, masks, sampler, known tokens kept).
"""

from __future__ import annotations

from dataclasses import asdict

from arpg.decoders import zero_shot_decoder
from arpg.sweeps import first_run
from arpg.stages import (POINT_COMPUTE_KEYS, STUDY_DECODING_KEYS, TOKEN_SPACE_KEYS, VQ_KEYS, Ctx, Job, Rule, gpu_count,
                         key_list, log_path)


EXPANSION_CONTEXT = {
    "extend": "tokens of the bicubic up-scaled image on a lattice with one token per training-grid cell",
    "interpolate": "the image's own tokens at cells (k r, k c) of a grid k times the training grid, RoPE "
                   "positions scaled by 1/k (their trained angles)",
}


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    inputs = (str(lay.model_checkpoint(zero_shot_decoder().name, first_run(params))), str(lay.tokenizer_checkpoint),
              str(lay.images("test")), str(lay.labels("test")), str(lay.data_manifest))  # + class names
    outputs = tuple(str(lay.gallery_image(t)) for t in params["gallery"]["tasks"]) + (str(lay.gallery_json),)
    return Job("gallery", {}, ("gallery",), inputs, outputs,
               key_list(POINT_COMPUTE_KEYS, "gallery", STUDY_DECODING_KEYS, "seed", VQ_KEYS, TOKEN_SPACE_KEYS),
               threads=params["point_threads"], gpus=gpu_count(params), log=log_path(ctx, "gallery", w, ()))


RULE = Rule("gallery", (), _job, lambda p: [{}] if zero_shot_decoder() else [],
            desc="Draw the zero-shot editing galleries (inpainting, outpainting, continuation, expansion).")


def configure(parser) -> None:
    parser.epilog = "Tasks, image count, steps, guidance and expansion size come from the `gallery:` section."


MIN_TILE_PX = 96  # every image at least this many pixels on screen (nearest-neighbour up-scale)
LABEL_PAD_PX = 6  # around the column and row labels


def panel(result: dict, row_labels: list[str], column_labels: list[str]):
    """PIL image: a header of column labels, then one row per input (its class name on the left),
    columns input | mask | outputs, every tile nearest up-scaled to at least MIN_TILE_PX."""
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageDraw

    from arpg.data.pixels import to_uint8

    outputs_BSCHW = result["outputs"]
    B, S, C, H, W = outputs_BSCHW.shape

    def fit(x_BCHW):  # the expansion's input is already at output size; others are too
        return x_BCHW if x_BCHW.shape[-1] == W else F.interpolate(x_BCHW, size=(H, W), mode="nearest")

    columns = [fit(result["input"]), fit(result["mask"]), *outputs_BSCHW.unbind(1)]  # each [B, C, H, W]
    grid_BCHW = torch.cat(columns, dim=-1)  # [B, C, H, (2 + S) W]
    scale = -(-MIN_TILE_PX // H)  # ceil: nearest up-scale keeps every token cell crisp
    pixels = to_uint8(torch.cat(grid_BCHW.unbind(0), dim=-2)).permute(1, 2, 0).cpu().numpy()  # [B H, ..., C]
    pixels = pixels.repeat(scale, 0).repeat(scale, 1)
    images = Image.fromarray(pixels[..., 0] if C == 1 else pixels)
    draw = ImageDraw.Draw(images)  # only to measure text
    left = int(max(draw.textlength(t) for t in row_labels)) + 2 * LABEL_PAD_PX
    top = int(draw.textbbox((0, 0), "Ag")[3]) + 2 * LABEL_PAD_PX
    canvas = Image.new(images.mode, (left + images.width, top + images.height), 0)
    canvas.paste(images, (left, top))
    draw = ImageDraw.Draw(canvas)
    tile_h, tile_w = H * scale, W * scale
    for c, text in enumerate(column_labels):
        draw.text((left + c * tile_w + LABEL_PAD_PX, LABEL_PAD_PX), text, fill=255 if C == 1 else (255,) * 3)
    for r, text in enumerate(row_labels):
        draw.text((LABEL_PAD_PX, top + r * tile_h + tile_h // 2), text, anchor="lm",
                  fill=255 if C == 1 else (255,) * 3)
    return canvas


def class_names(params) -> list[str]:
    """The data's class names, from the manifest `arpg prepare-data` wrote."""
    from arpg.checkpoint_io import read_json

    return list(read_json(params.layout.data_manifest, "the data manifest (the gallery labels rows with its class "
                          "names)", written_by="arpg prepare-data")["class_names"])


def run(args, params) -> None:
    from arpg import dist

    with dist.session(params["device"]) as (_, device):
        _gallery(params, device)


def _gallery(params, device) -> None:
    import numpy as np
    import torch

    from arpg.data.arrays import load_images, load_labels
    from arpg.data.pixels import from_uint8
    from arpg.engine.sampler import SamplerConfig
    from arpg.engine.zero_shot import pick_images, run_task
    from arpg.models.checkpoint import load_study_models
    from arpg.tracking import stage_run
    from arpg.utils import atomic_save_png, derive_seed, make_generator, write_json

    gal, smp = params["gallery"], params["sample"]
    layout = params.layout
    run_params = {"steps": gal["steps"], "cfg": gal["cfg"], "order": "random", "seed": params["seed"],
                  "tasks": ",".join(gal["tasks"]), "num_images": gal["num_images"]}
    # the run is open before any work (loading, encoding), so any failure ends it FAILED
    with stage_run(params, "gallery", run_params=run_params) as run:
        model, tokenizer = load_study_models(params, zero_shot_decoder().name, device)
        images_N = load_images(layout, "test")
        labels_N = load_labels(layout, "test")
        index = pick_images(labels_N, gal["num_images"])
        # a channels-last view, not to_tensor_NCHW's contiguous copy: for RGB the encoder's bits depend on it
        images_BCHW = from_uint8(torch.from_numpy(np.ascontiguousarray(images_N[index])))
        images_BCHW = images_BCHW.permute(0, 3, 1, 2).to(device)  # [B, C, H, W]
        labels_B = torch.from_numpy(labels_N[index]).long().to(device)
        sampler = SamplerConfig(steps=gal["steps"], cfg=gal["cfg"], cfg_schedule=smp["cfg_schedule"],
                                schedule=smp["schedule"], temperature=smp["temperature"], top_k=smp["top_k"],
                                top_p=smp["top_p"], confidence_noise=smp["confidence_noise"])
        names = class_names(params)
        row_labels = [names[int(c)] for c in labels_B.tolist()]
        column_labels = ["input", "model sees", *[f"output {i + 1}" for i in range(gal["samples"])]]
        doc = {"test_indices": index, "labels": labels_B.tolist(), "class_names": row_labels, "seed": params["seed"],
               "sampler": asdict(sampler), "samples_per_image": gal["samples"], "order": "random",
               "columns": ["input", "what the model sees: the input, unknown cells grey",
                           *[f"output {i + 1}" for i in range(gal["samples"])]],
               "tasks": {}}
        for t, task in enumerate(gal["tasks"]):
            result = run_task(task, model, tokenizer, images_BCHW, labels_B, samples=gal["samples"],
                              expand_to=gal["expand_to"], sampler=sampler, expansion=gal["expansion"],
                              generator=make_generator(derive_seed(params["seed"], t), device))
            atomic_save_png(panel(result, row_labels, column_labels), layout.gallery_image(task))
            grid = result["grid"]
            doc["tasks"][task] = {
                "image": str(layout.gallery_image(task)), "token_grid": grid,
                "training_grid": model.config.grid_size, "known_tokens": result["known"],
                "generated_tokens": grid * grid - result["known"], "known_tokens_kept": result["known_kept"],
                "context": {"inpainting": "every token outside the centre square (half the side)",
                            "outpainting": "the centre square (half the side); everything around it generated",
                            "continuation": "the top half of the rows; the lower half generated",
                            "resolution-expansion": EXPANSION_CONTEXT[gal["expansion"]]}[task],
            }
            run.log_metrics({f"{task}_known_tokens_kept": float(result["known_kept"])})
            run.log_artifact(layout.gallery_image(task))
            print(f"{task}: {grid}x{grid} tokens, {result['known']} known (kept: {result['known_kept']}) "
                  f"-> {layout.gallery_image(task)}")
        write_json(layout.gallery_json, doc)
        run.log_artifact(layout.gallery_json)
    print(f"wrote {layout.gallery_json}")
