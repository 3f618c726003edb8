"""VQ autoencoder: LlamaGen layout and numerics, encode / decode, strict checkpoints."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from arpg.checkpoint_io import load_state_strict
from arpg.errors import CheckpointError, ConfigError
from arpg.models.vq import (VQConfig, VQModel, load_tokenizer, tokenizer_payload)
from arpg.utils import atomic_torch_save, make_generator



SMALL = VQConfig(in_channels=3, base_channels=32, channel_mult=(1, 2), num_res_blocks=2, z_channels=32,
                 codebook_size=64, codebook_dim=8, l2_norm_codes=True, norm_groups=32)


def random_model(cfg: VQConfig, seed: int = 0) -> VQModel:
    """A model whose every parameter (norm affines and codebook included) is random."""
    model = VQModel(cfg)
    gen = make_generator(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name and name.endswith(".weight"):  # GroupNorm scales near 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 4:
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


# --- an independent functional reference of LlamaGen's VQModel, read from a state dict ---

def _gn(sd, key, x):
    return F.group_norm(x, 32, sd[key + ".weight"], sd[key + ".bias"], eps=1e-6)


def _conv(sd, key, x, stride=1, padding=0):
    return F.conv2d(x, sd[key + ".weight"], sd[key + ".bias"], stride=stride, padding=padding)


def _res(sd, key, x):
    h = _gn(sd, key + ".norm1", x)
    h = h * torch.sigmoid(h)
    h = _conv(sd, key + ".conv1", h, padding=1)
    h = _gn(sd, key + ".norm2", h)
    h = h * torch.sigmoid(h)
    h = _conv(sd, key + ".conv2", h, padding=1)
    if key + ".nin_shortcut.weight" in sd:
        x = _conv(sd, key + ".nin_shortcut", x)
    return x + h


def _attn(sd, key, x):
    h = _gn(sd, key + ".norm", x)
    q, k, v = (_conv(sd, f"{key}.{n}", h) for n in "qkv")
    b, c, hh, ww = q.shape
    w_ = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c ** -0.5
    w_ = torch.softmax(w_, dim=2)
    out = torch.bmm(v.reshape(b, c, hh * ww), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, key + ".proj_out", out)


def _count(sd, prefix):
    """Number of indexed children under prefix (e.g. 'encoder.conv_blocks')."""
    return len({k[len(prefix) + 1:].split(".")[0] for k in sd if k.startswith(prefix + ".")})


def _ref_levels(sd, prefix, h, resample):
    """The resolution levels under prefix: res blocks (each with attention where the keys have it),
    then resample(h, level prefix) on every level but the last."""
    levels = _count(sd, prefix)
    for i in range(levels):
        p = f"{prefix}.{i}"
        for j in range(_count(sd, p + ".res")):
            h = _res(sd, f"{p}.res.{j}", h)
            if f"{p}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"{p}.attn.{j}", h)
        if i != levels - 1:
            h = resample(h, p)
    return h


def _ref_mid(sd, prefix, h):
    return _res(sd, f"{prefix}.2", _attn(sd, f"{prefix}.1", _res(sd, f"{prefix}.0", h)))


def ref_encoder(sd, x):
    h = _conv(sd, "encoder.conv_in", x, padding=1)
    h = _ref_levels(sd, "encoder.conv_blocks", h,
                    lambda h, p: _conv(sd, f"{p}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2))
    h = _gn(sd, "encoder.norm_out", _ref_mid(sd, "encoder.mid", h))
    return _conv(sd, "encoder.conv_out", h * torch.sigmoid(h), padding=1)


def ref_decoder(sd, z):
    h = _ref_mid(sd, "decoder.mid", _conv(sd, "decoder.conv_in", z, padding=1))
    h = _ref_levels(sd, "decoder.conv_blocks", h, lambda h, p: _conv(
        sd, f"{p}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), padding=1))
    h = _gn(sd, "decoder.norm_out", h)
    return _conv(sd, "decoder.conv_out", h * torch.sigmoid(h), padding=1)


def ref_quantize(sd, z, l2_norm):
    """LlamaGen's VectorQuantizer.forward in eval mode: (straight-through z_q, indices)."""
    z = torch.einsum("bchw->bhwc", z).contiguous()
    zf = z.view(-1, z.shape[-1])
    emb = sd["quantize.embedding.weight"]
    if l2_norm:
        z, zf, emb = F.normalize(z, dim=-1), F.normalize(zf, dim=-1), F.normalize(emb, dim=-1)
    d = (zf ** 2).sum(1, keepdim=True) + (emb ** 2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf, emb.t())
    idx = torch.argmin(d, dim=1)
    zq = emb[idx].view(z.shape)
    zq = z + (zq - z).detach()
    return torch.einsum("bhwc->bchw", zq), idx


def ref_forward(sd, x, l2_norm=True):
    z = _conv(sd, "quant_conv", ref_encoder(sd, x))
    zq, idx = ref_quantize(sd, z, l2_norm)
    return ref_decoder(sd, _conv(sd, "post_quant_conv", zq)), idx


def ref_decode_code(sd, idx, shape, l2_norm=True):
    emb = sd["quantize.embedding.weight"]
    emb = F.normalize(emb, dim=-1) if l2_norm else emb
    b, c, h, w = shape
    zq = emb[idx].reshape(b, h, w, c).permute(0, 3, 1, 2)
    return ref_decoder(sd, _conv(sd, "post_quant_conv", zq))


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("l2_norm", [True, False])
def test_matches_llamagen_reference_on_random_weights(l2_norm):
    cfg = VQConfig(**{**SMALL.__dict__, "l2_norm_codes": l2_norm})
    model = random_model(cfg, seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 3, 16, 16, generator=make_generator(2)) * 2 - 1  # [B, C, H, W]
    with torch.no_grad():
        ref_recon, ref_idx = ref_forward(sd, x, l2_norm)
        tokens = model.encode(x)
        out = model(x)
        decoded = model.decode(tokens)
        ref_decoded = ref_decode_code(sd, ref_idx, (3, cfg.codebook_dim, 8, 8), l2_norm)
    assert tokens.shape == (3, 8, 8) and tokens.dtype == torch.int64
    assert torch.equal(tokens.flatten(), ref_idx)
    assert len(ref_idx.unique()) > 4  # the comparison is not between constant code maps
    assert (out.recon_BCHW - ref_recon).abs().max().item() <= 1e-5
    assert (decoded - ref_decoded).abs().max().item() <= 1e-5
    assert ref_recon.abs().mean().item() > 1e-2  # non-trivial reconstructions


def test_vq16_state_dict_layout_matches_llamagen():
    """The default config spells vq_ds16_c2i.pt's keys and shapes (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = VQModel(VQConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["quantize.embedding.weight"] == (16384, 8)
    assert shapes["quantize.codebook_used"] == (65536,)
    assert shapes["quant_conv.weight"] == (8, 256, 1, 1)
    assert shapes["post_quant_conv.weight"] == (256, 8, 1, 1)
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    # encoder: 5 levels x 2 res; attention only in the last level; downsample on levels 0..3
    assert {k.split(".")[2] for k in shapes if k.startswith("encoder.conv_blocks.")} == set("01234")
    assert [k for k in shapes if ".attn." in k and k.startswith("encoder.conv_blocks")] and all(
        k.startswith("encoder.conv_blocks.4.attn.") for k in shapes if k.startswith("encoder.conv_blocks") and ".attn." in k)
    assert {f"encoder.conv_blocks.{i}.downsample.conv.weight" for i in range(4)} <= set(shapes)
    assert "encoder.conv_blocks.4.downsample.conv.weight" not in shapes
    assert "encoder.conv_blocks.4.attn.1.proj_out.weight" in shapes
    assert "encoder.conv_blocks.2.res.0.nin_shortcut.weight" in shapes  # 128 -> 256
    assert "encoder.conv_blocks.1.res.0.nin_shortcut.weight" not in shapes
    # decoder: deepest level first, 3 res + 3 attn there, upsample on levels 0..3
    assert "decoder.conv_blocks.0.res.2.conv2.weight" in shapes
    assert "decoder.conv_blocks.0.attn.2.q.weight" in shapes
    assert not any(k.startswith("decoder.conv_blocks.1.attn") for k in shapes)
    assert {f"decoder.conv_blocks.{i}.upsample.conv.weight" for i in range(4)} <= set(shapes)
    assert "decoder.conv_blocks.4.upsample.conv.weight" not in shapes
    assert {f"encoder.mid.{i}" for i in range(3)} == {".".join(k.split(".")[:3]) for k in shapes
                                                     if k.startswith("encoder.mid.")}
    assert "encoder.mid.1.q.weight" in shapes and "decoder.mid.1.proj_out.weight" in shapes
    assert "encoder.norm_out.weight" in shapes and "decoder.norm_out.bias" in shapes
    assert not any("resample" in k or "dropout" in k for k in shapes)


def test_encode_decode_shapes_and_gradient_reaches_encoder():
    cfg = VQConfig(in_channels=1, base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                   codebook_size=16, codebook_dim=4, norm_groups=4)
    model = VQModel(cfg).train()
    x = torch.rand(2, 1, 32, 32, generator=make_generator(0)) * 2 - 1
    out = model(x)
    assert out.recon_BCHW.shape == x.shape and out.tokens_Bhw.shape == (2, 8, 8)
    (out.recon_BCHW.pow(2).mean() + out.commit_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through estimator
    assert model.quantize.embedding.weight.grad is None  # codes move only through the codebook loss
    out = model(x)
    out.codebook_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert (model.quantize.usage_counts().sum() == 2 * 2 * 64).item()  # two training batches recorded


def test_group_count_must_divide_widths():
    with pytest.raises(ConfigError, match="norm_groups"):
        VQConfig(base_channels=24, channel_mult=(1, 2), norm_groups=32)


def test_round_trip_save_load_same_codes(tmp_path):
    model = random_model(SMALL, seed=3)
    path = tmp_path / "tokenizer.pt"
    atomic_torch_save(tokenizer_payload(model), path)
    loaded = load_tokenizer(path)
    assert loaded.config == SMALL
    x = torch.rand(4, 3, 16, 16, generator=make_generator(4)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x), loaded.encode(x))
        assert torch.equal(model.decode(model.encode(x)), loaded.decode(loaded.encode(x)))


def test_llamagen_checkpoint_layout_loads_with_given_config(tmp_path):
    """vq_ds16_c2i.pt style: torch.load(f)['model'], plus optimizer / args entries and no config."""
    model = random_model(SMALL, seed=5)
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "steps": 10,
                "args": argparse.Namespace(vq_model="VQ-16")}, path)
    with pytest.raises(CheckpointError, match="no tokenizer config"):
        load_tokenizer(path)
    loaded = load_tokenizer(path, SMALL)
    x = torch.rand(2, 3, 16, 16, generator=make_generator(6)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x), loaded.encode(x))


def test_broken_checkpoints_name_the_keys(tmp_path):
    model = random_model(SMALL)
    good = model.state_dict()
    broken = {k: v for k, v in good.items() if k != "decoder.conv_out.bias"}
    broken["decoder.extra.weight"] = torch.zeros(1)
    broken["quant_conv.weight"] = torch.zeros(4, 32, 1, 1)
    with pytest.raises(CheckpointError) as err:
        load_state_strict(VQModel(SMALL), broken, "test.pt", "fix the sizes")
    text = str(err.value)
    assert text.startswith("test.pt does not fit the VQModel") and text.endswith("fix: fix the sizes")
    assert "missing keys (1): decoder.conv_out.bias" in text
    assert "unexpected keys (1): decoder.extra.weight" in text
    assert "mis-shaped keys (1): quant_conv.weight (checkpoint (4, 32, 1, 1), model (8, 32, 1, 1))" in text

    path = tmp_path / "tokenizer.pt"
    torch.save({"model": broken, "config": tokenizer_payload(model)["config"]}, path)
    with pytest.raises(CheckpointError, match="decoder.extra.weight"):
        load_tokenizer(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_tokenizer(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "missing.pt")


def test_config_mismatch_with_params_is_named(tmp_path):
    model = random_model(SMALL)
    path = tmp_path / "tokenizer.pt"
    atomic_torch_save(tokenizer_payload(model), path)
    other = VQConfig(**{**SMALL.__dict__, "codebook_size": 128})
    with pytest.raises(CheckpointError, match="codebook_size"):
        load_tokenizer(path, other)
