"""Named model sizes (torch-free): the published ARPG / LlamaGen sizes and the small ones of the
embedded default. arpg/models/registry.py builds them; the params schema (config.schema) offers
each decoder the sizes of its network, so an unknown or mismatched size is refused before any job runs.
"""

from __future__ import annotations

# name -> (network, size fields); ffn_multiple_of 256 as published, smaller for the small sizes so the
# SwiGLU hidden size stays near 8/3 * dim.
# The embedded default trains for minutes, far from overfitting: dropout would only slow it down.
# Its models are trained here, not loaded from a release, so they anchor the class token's RoPE
# (layers.rope_2d): on centred 8x8-token Fashion-MNIST a query needs its absolute position.
_SMALL = dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_rope="anchor")

SIZES: dict[str, tuple[str, dict]] = {
    "ARPG-L": ("arpg", dict(dim=1024, n_heads=16, n_self_layers=12, n_cross_layers=12)),
    "ARPG-XL": ("arpg", dict(dim=1280, n_heads=20, n_self_layers=18, n_cross_layers=18)),
    "ARPG-XXL": ("arpg", dict(dim=1536, n_heads=24, n_self_layers=24, n_cross_layers=24)),
    "LlamaGen-L": ("raster", dict(dim=1024, n_heads=16, n_layers=24)),
    "LlamaGen-XL": ("raster", dict(dim=1280, n_heads=20, n_layers=36)),
    # embedded default (8x8 tokens, ~512 codes, 10 classes, minutes of CPU)
    # width 96: 1.5x the tokens of width 128 in the same CPU minutes, which beat the wider model on
    # 8-step sample accuracy (docs/DESIGN.md)
    "ARPG-S": ("arpg", dict(dim=96, n_heads=4, n_self_layers=4, n_cross_layers=4, ffn_multiple_of=32, **_SMALL)),
    "LlamaGen-S": ("raster", dict(dim=96, n_heads=4, n_layers=8, ffn_multiple_of=32, **_SMALL)),
    # tests and smoke runs
    "ARPG-T": ("arpg", dict(dim=64, n_heads=4, n_self_layers=2, n_cross_layers=2, ffn_multiple_of=32)),
    "LlamaGen-T": ("raster", dict(dim=64, n_heads=4, n_layers=4, ffn_multiple_of=32)),
}

# The one place that pairs a published ARPG size with its same-backbone raster twin (same width,
# heads and total depth; the profile checks it when it builds the pair).
RASTER_TWIN: dict[str, str] = {"ARPG-T": "LlamaGen-T", "ARPG-S": "LlamaGen-S", "ARPG-L": "LlamaGen-L",
                               "ARPG-XL": "LlamaGen-XL"}


def sizes_of(network: str) -> list[str]:
    """The size names that build `network` (a decoder's network)."""
    return [name for name, (n, _) in SIZES.items() if n == network]
