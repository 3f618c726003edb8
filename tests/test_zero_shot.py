"""Zero-shot tasks through pre-filled context: known tokens never change, only unknowns are queried."""

from __future__ import annotations

import math

import pytest
import torch

from arpg.engine import sampler as S
from arpg.engine import zero_shot as Z
from arpg.errors import ArpgError
from arpg.models.registry import build_model
from arpg.models.vq import VQConfig, VQModel
from arpg.utils import make_generator

GRID, CODES, CLASSES = 4, 32, 3




@pytest.fixture(scope="module")
def arpg():
    gen = make_generator(0)
    model = build_model("ARPG-T", codebook_size=CODES, num_classes=CLASSES, grid_size=GRID, generator=gen)
    torch.nn.init.normal_(model.head.weight, std=1.0, generator=gen)
    return model.eval()


class Recorder:
    def __init__(self, model):
        self.model, self.fed, self.queried = model, [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def extend_context(self, cache, ids_BT, pos_BT):
        self.fed.append(pos_BT.clone())
        return self.model.extend_context(cache, ids_BT, pos_BT)

    def query(self, cache, pos_BQ):
        self.queried.append(pos_BQ.clone())
        return self.model.query(cache, pos_BQ)


SAMPLER = S.SamplerConfig(steps=3, cfg=2.0, cfg_schedule="linear", schedule="arccos", temperature=1.0, top_k=0,
                           top_p=1.0, confidence_noise=0.0)


def test_masks():
    assert Z.centre_box(4).int().tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    lat = Z.lattice(2, 5)  # cell centres (0.5, 1.5) * 2.5 -> 1, 3
    assert lat.nonzero().tolist() == [[1, 1], [1, 3], [3, 1], [3, 3]]
    assert Z.lattice(8, 12).sum() == 64
    with pytest.raises(ArpgError, match="expand_to"):
        Z.lattice(8, 6)


@pytest.mark.parametrize("task", ["inpainting", "outpainting"])
def test_known_tokens_kept_and_only_unknowns_queried(arpg, task):
    tokens = torch.randint(0, CODES, (3, GRID, GRID), generator=make_generator(1))
    labels = torch.tensor([0, 1, 2])
    rec = Recorder(arpg)
    fn = Z.inpaint if task == "inpainting" else Z.outpaint
    out = fn(rec, tokens, labels, sampler=SAMPLER, generator=make_generator(2))
    known = out.known_hw
    assert known.sum() in (4, 12)
    assert torch.equal(out.tokens_Bhw[:, known], tokens[:, known])
    unknown_pos = (~known).flatten().nonzero().flatten()
    queried = torch.cat(rec.queried, dim=1)
    assert torch.equal(queried.sort(dim=1).values, unknown_pos.expand(queried.shape[0], -1))
    # pre-fill: the class alone, then every known token, before any query
    assert (rec.fed[0] == -1).all()
    assert torch.equal(rec.fed[1].sort(dim=1).values, known.flatten().nonzero().flatten().expand(6, -1))
    # the generated region actually changed somewhere (tokens are sampled, not copied)
    assert not torch.equal(out.tokens_Bhw[:, ~known], tokens[:, ~known])


def test_context_changes_the_prediction(arpg):
    """The same seed with different known tokens gives different completions: the context is read."""
    labels = torch.tensor([0, 0])
    a = torch.zeros(2, GRID, GRID, dtype=torch.long)
    b = torch.full((2, GRID, GRID), 5, dtype=torch.long)
    hole = Z.centre_box(GRID)
    out_a = Z.inpaint(arpg, a, labels, sampler=SAMPLER, generator=make_generator(4))
    out_b = Z.inpaint(arpg, b, labels, sampler=SAMPLER, generator=make_generator(4))
    assert not torch.equal(out_a.tokens_Bhw[:, hole], out_b.tokens_Bhw[:, hole])


def test_context_with_uneven_known_counts_rejected(arpg):
    known = torch.zeros(2, GRID * GRID, dtype=torch.bool)
    known[0, 0] = True
    ctx = S.Context(tokens_BN=torch.zeros(2, GRID * GRID, dtype=torch.long), known_BN=known)
    with pytest.raises(ArpgError, match="same number"):
        S.generate_arpg(arpg, torch.tensor([0, 1]), steps=2, generator=make_generator(0), context=ctx)


def test_resolution_expansion_keeps_lattice_and_extends_rope(arpg):
    vq = VQModel(VQConfig(in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=32,
                          codebook_size=CODES, codebook_dim=4, norm_groups=8)).eval()
    images = torch.rand(2, 1, GRID * 2, GRID * 2, generator=make_generator(5)) * 2 - 1
    rec = Recorder(arpg)
    out, big = Z.expand_resolution(rec, vq, images, torch.tensor([1, 2]), expand_to=6, sampler=SAMPLER,
                                   generator=make_generator(6))
    assert big.shape == (2, 1, 12, 12) and out.tokens_Bhw.shape == (2, 6, 6)
    with torch.inference_mode():
        context = vq.encode(big)
    known = Z.lattice(GRID, 6)
    assert torch.equal(out.tokens_Bhw[:, known], context[:, known])
    queried = torch.cat(rec.queried, dim=1)
    unknown = (~known).flatten().nonzero().flatten()  # 20 positions, many beyond the 4x4 training grid
    assert torch.equal(queried.sort(dim=1).values, unknown.expand(queried.shape[0], -1)) and unknown.max() > 15
    # the RoPE table used is the 6x6 one: 1 + 36 rows
    assert arpg.rope_tables(6, torch.device("cpu"))[0].shape[0] == 37


def test_interpolated_expansion_keeps_the_images_tokens_at_their_trained_angles(arpg):
    vq = VQModel(VQConfig(in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=32,
                          codebook_size=CODES, codebook_dim=4, norm_groups=8)).eval()
    images = torch.rand(2, 1, GRID * 2, GRID * 2, generator=make_generator(5)) * 2 - 1
    out, big = Z.expand_resolution(arpg, vq, images, torch.tensor([1, 2]), expand_to=2 * GRID, sampler=SAMPLER,
                                   generator=make_generator(6), method="interpolate")
    assert out.tokens_Bhw.shape == (2, 8, 8) and big.shape == (2, 1, 16, 16)
    with torch.inference_mode():
        original = vq.encode(images)  # [2, 4, 4]: not the up-scaled image's tokens
    assert torch.equal(out.tokens_Bhw[:, ::2, ::2], original) and out.known_kept
    assert int(out.known_hw.sum()) == GRID * GRID
    # positions scaled by 1/2: cell (2r, 2c) of the 8x8 table has exactly the angles of (r, c) of the 4x4 one
    cos8, sin8 = arpg.rope_tables(8, torch.device("cpu"), 0.5)
    cos4, sin4 = arpg.rope_tables(4, torch.device("cpu"))
    even = torch.tensor([2 * r * 8 + 2 * c for r in range(4) for c in range(4)])
    assert torch.equal(cos8[1 + even], cos4[1:]) and torch.equal(sin8[1 + even], sin4[1:])
    assert torch.equal(cos8[0], cos4[0])  # the class slot keeps its own angles
    with pytest.raises(ArpgError, match="multiple of the training grid"):
        Z.expand_resolution(arpg, vq, images, torch.tensor([1, 2]), expand_to=6, sampler=SAMPLER,
                            generator=make_generator(6), method="interpolate")


def test_gallery_command(params_file):
    import json

    from PIL import Image

    from arpg.cli import main
    from arpg.commands.gallery import MIN_TILE_PX
    from test_sampler import make_tiny_study

    params = make_tiny_study(params_file, **{"tracking.enabled": False, "gallery.expansion": "extend",
                                             "gallery.expand_to": 6})
    assert main(["gallery", "--params", str(params.path)]) == 0
    layout = params.layout
    doc = json.loads(layout.gallery_json.read_text())
    assert doc["test_indices"] == [0, 1] and doc["labels"] == [0, 1]
    assert doc["class_names"] == ["class 0", "class 1"]  # the manifest's names, one per row
    sizes = {"inpainting": (4, 12), "outpainting": (4, 4), "continuation": (4, 8), "resolution-expansion": (6, 16)}
    for task, (grid, known) in sizes.items():
        entry = doc["tasks"][task]
        assert entry["token_grid"] == grid and entry["known_tokens"] == known and entry["known_tokens_kept"]
        tile = grid * 2 * -(-MIN_TILE_PX // (grid * 2))  # tokenizer downsampling 2, nearest up-scale to >= 96 px
        # rows: 2 images; columns: input, mask, 2 outputs; plus a label column and a header row
        width, height = Image.open(layout.gallery_image(task)).size
        assert tile >= MIN_TILE_PX and width > (2 + 2) * tile and height > 2 * tile
        assert width - (2 + 2) * tile < 2 * tile and height - 2 * tile < tile  # the labels take a margin only
    assert "up-scaled" in doc["tasks"]["resolution-expansion"]["context"]
    assert "top half" in doc["tasks"]["continuation"]["context"]

    interpolated = make_tiny_study(params_file, **{"tracking.enabled": False, "gallery.expansion": "interpolate",
                                                   "gallery.expand_to": 8, "gallery.tasks": ["resolution-expansion"]})
    assert main(["gallery", "--params", str(interpolated.path)]) == 0
    entry = json.loads(interpolated.layout.gallery_json.read_text())["tasks"]["resolution-expansion"]
    assert entry["token_grid"] == 8 and entry["known_tokens"] == 16 and entry["known_tokens_kept"]
    assert "scaled by 1/k" in entry["context"]


def test_pick_images_cycles_classes():
    assert Z.pick_images([2, 0, 0, 1, 2], 4) == [1, 3, 0, 2]
    with pytest.raises(ArpgError, match="num_images"):
        Z.pick_images([0, 1], 3)


# ---- measured edits (`arpg zero-shot`) -------------------------------------------------------------

@pytest.mark.parametrize("task", ["inpainting", "outpainting"])
@pytest.mark.parametrize("mask", Z.MASKS)
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_masks_hold_exactly_the_requested_known_fraction(task, mask, fraction):
    known = Z.known_mask(task, mask, 8, fraction, 5, make_generator(3))
    assert known.shape == (5, 8, 8) and known.dtype == torch.bool
    assert known.flatten(1).sum(1).tolist() == [round(fraction * 64)] * 5


def test_mask_shapes():
    """Centre: the hole of inpainting is the grid's centre block, outpainting keeps it; random-block: a
    block per image from the generator (seeded: the same twice); top-rows: the first rows."""
    hole = ~Z.known_mask("inpainting", "centre", 8, 0.75, 1, make_generator(0))[0]
    assert hole[2:6, 2:6].all() and hole.sum() == 16  # 16 cells nearest the centre: the 4x4 block
    assert torch.equal(Z.known_mask("outpainting", "centre", 8, 0.25, 1, make_generator(0))[0], hole)
    a = Z.known_mask("outpainting", "random-block", 8, 0.25, 6, make_generator(1))
    assert torch.equal(a, Z.known_mask("outpainting", "random-block", 8, 0.25, 6, make_generator(1)))
    assert len({tuple(m.flatten().tolist()) for m in a}) > 1  # images get their own block
    rows = Z.known_mask("inpainting", "top-rows", 8, 0.5, 2, make_generator(0))
    assert rows[:, :4].all() and not rows[:, 4:].any()
    with pytest.raises(ArpgError, match="zeroshot.fractions"):
        Z.known_count(8, 0.001)
    with pytest.raises(ArpgError, match="zeroshot.masks"):
        Z.known_mask("inpainting", "ring", 8, 0.5, 1, make_generator(0))


def test_per_image_masks_keep_every_known_token(arpg):
    tokens = torch.randint(0, CODES, (4, GRID, GRID), generator=make_generator(1))
    known = Z.known_mask("inpainting", "random-block", GRID, 0.5, 4, make_generator(2))
    assert len({tuple(m.flatten().tolist()) for m in known}) > 1
    out = Z.complete(arpg, tokens, known, torch.tensor([0, 1, 2, 0]), sampler=SAMPLER, generator=make_generator(3))
    assert out.known_kept and torch.equal(out.tokens_Bhw[known], tokens[known])
    assert not torch.equal(out.tokens_Bhw[~known], tokens[~known])


def test_raster_completion_keeps_the_top_rows_and_reads_them():
    from test_sampler import _tiny

    raster = _tiny("LlamaGen-T")
    labels = torch.tensor([0, 1, 2])
    prefix = torch.randint(0, CODES, (3, 2 * GRID), generator=make_generator(4))  # the top two rows
    out = S.generate_raster(raster, labels, cfg=2.0, generator=make_generator(5), prefix_BK=prefix)
    assert out.shape == (3, GRID * GRID) and torch.equal(out[:, :2 * GRID], prefix)
    other = S.generate_raster(raster, labels, cfg=2.0, generator=make_generator(5), prefix_BK=(prefix + 1) % CODES)
    assert not torch.equal(other[:, 2 * GRID:], out[:, 2 * GRID:])  # the rows below depend on the given ones
    with pytest.raises(ArpgError, match="prefix"):
        S.generate_raster(raster, labels, generator=make_generator(5), prefix_BK=torch.zeros(3, GRID * GRID).long())


def test_cells_follow_the_params(params_file):
    from arpg.config import load_params
    from arpg import pipeline
    from arpg.commands.zero_shot import all_cells, cell_models, cells

    params = load_params(params_file())
    keys = [c.key for c in all_cells(params)]
    assert len(keys) == len(set(keys)) == 2 * 3 * 2 * 2 + 3 * 3 + 2  # in/outpaint, continuation, expansion
    assert "continuation-top-rows-50-raster-seq" in keys and "inpainting-top-rows-50-arpg-s8" not in keys
    assert "resolution-expansion-interpolate-25-arpg-s8" in keys
    assert {c.task for c in cells(params, "outpainting")} == {"outpainting"}
    assert cell_models(params, "continuation") == ["arpg", "raster"] and cell_models(params, "inpainting") == ["arpg"]
    # one job per task, each reading only the checkpoints its cells decode with
    jobs = {j.wildcards["task"]: j for j in pipeline.jobs(params) if j.rule == "zero_shot"}
    assert list(jobs) == list(params["zeroshot"]["tasks"])
    assert [any(str(params.layout.model_checkpoint("raster")) == i for i in j.inputs) for j in jobs.values()] == [
        t == "continuation" for t in jobs]
    only = load_params(params_file(**{"zeroshot.tasks": ["continuation"], "zeroshot.masks": ["centre"]}))
    with pytest.raises(ArpgError, match="zeroshot.masks"):
        cells(only, "continuation")
    with pytest.raises(ArpgError, match="unknown zero-shot task 'painting'"):
        cells(params, "painting")


def _measured_study(params_file, **extra):
    from arpg.cli import main
    from arpg.engine.classifier import model_config_from_params
    from arpg.models.classifier import Classifier, save_classifier
    from arpg.utils import seeded_global_rng
    from test_sampler import make_tiny_study

    with seeded_global_rng(0):  # the tiny study's random weights: the same every call
        params = make_tiny_study(params_file, **{
            "tracking.enabled": False, "gallery.expand_to": 8, "zeroshot.num_images": 6, "zeroshot.batch_size": 4,
            "zeroshot.steps": [2], "zeroshot.fractions": [0.5], "evaluate.kid_subset_size": 4,
            "evaluate.batch_size": 4, "evaluate.bootstrap": 5, **extra})
        save_classifier(Classifier(model_config_from_params(params)).eval(), params.layout.classifier_checkpoint)
    assert main(["reference-stats", "--params", str(params.path), "--extractor", "classifier"]) == 0
    return params


def test_zero_shot_command_writes_every_cell_with_intervals(params_file):
    import csv
    import json

    from arpg.cli import main
    from arpg.commands.zero_shot import cells

    params = _measured_study(params_file)
    for task in params["zeroshot"]["tasks"]:
        assert main(["zero-shot", "--params", str(params.path), "--task", task]) == 0
    written = {t: params.layout.zeroshot_json(t).read_bytes() for t in params["zeroshot"]["tasks"]}
    docs = {t: json.loads(b) for t, b in written.items()}
    for task, doc in docs.items():
        assert doc["task"] == task and [c["key"] for c in doc["cells"]] == [c.key for c in cells(params, task)]
        assert doc["num_images"] == 6 and doc["bootstrap"]["replicates"] == 5 and doc["cfg"] == 4.0
    for cell in (c for doc in docs.values() for c in doc["cells"]):
        assert cell["known_tokens_kept"] is True
        assert cell["known_tokens"] + cell["generated_tokens"] == (64 if cell["task"] == "resolution-expansion"
                                                                   else 16)
        for name in ("fid_classifier", "kid_classifier", "accuracy_classifier", "psnr"):
            band = cell["intervals"][name]
            assert band["lo"] <= cell["metrics"][name] <= band["hi"], (cell["key"], name)
        assert ("psnr_tokenizer" in cell["metrics"]) is (cell["task"] != "resolution-expansion")
    raster = next(c for c in docs["continuation"]["cells"] if c["model"] == "raster")
    assert raster["steps"] == raster["generated_tokens"] == 8 and not raster["parallel"]
    with open(params.layout.zeroshot_csv("continuation")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == [c["key"] for c in docs["continuation"]["cells"]]
    assert {"fid_classifier_se", "psnr_lo", "psnr_hi"} <= set(rows[0]) and "kid_std_classifier_se" not in rows[0]
    assert main(["zero-shot", "--params", str(params.path), "--task", "continuation"]) == 0
    assert params.layout.zeroshot_json("continuation").read_bytes() == written["continuation"]  # the same bytes


def test_zero_shot_command_without_reference_names_the_fix(params_file):
    from arpg.cli import main

    params = _measured_study(params_file)
    params.layout.reference_stats("classifier", "test").unlink()
    assert main(["zero-shot", "--params", str(params.path), "--task", "inpainting"]) == 2


def test_masked_psnr_counts_only_the_mask():
    from arpg.engine.image_metrics import QUANTISATION_MSE, masked_psnr

    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[:, :, :2] = 255  # the top half differs
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2:, :] = True  # the bottom half: identical
    assert masked_psnr(a, b, mask).tolist() == pytest.approx([10 * math.log10(255 ** 2 / QUANTISATION_MSE)] * 2)
    assert masked_psnr(a, b, ~mask).tolist() == pytest.approx([0.0, 0.0])  # MSE 255^2
