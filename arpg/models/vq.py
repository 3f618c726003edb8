"""VQ autoencoder with LlamaGen's "VQ-16" architecture and state-dict layout.

Every size is a parameter (`VQConfig`); the module tree spells the same keys as
LlamaGen's `vq_ds16_c2i.pt` (`encoder.conv_blocks.{i}.res.{j}.conv1`, ...,
`quantize.embedding.weight`, `quantize.codebook_used`, `quant_conv`,
`post_quant_conv`), so the released checkpoint loads strictly and gives the
same codes and reconstructions.

Images are [-1, 1] floats `images_BCHW` (arpg.data.pixels converts uint8); tokens are int64 `tokens_Bhw`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from arpg.checkpoint_io import load_state_strict, read_checkpoint
from arpg.errors import CheckpointError, ConfigError

# LlamaGen keeps the last 65536 code indices in `quantize.codebook_used` (a float buffer).
USAGE_WINDOW = 65536


@dataclass(frozen=True)
class VQConfig:
    """Sizes of the autoencoder. Defaults are LlamaGen's VQ-16 (vq_ds16_c2i.pt)."""

    in_channels: int = 3            # image channels (decoder outputs the same)
    base_channels: int = 128        # `ch` in LlamaGen
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level per entry; downsampling 2 ** (len - 1)
    num_res_blocks: int = 2         # encoder res blocks per level (decoder: one more)
    z_channels: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm_codes: bool = True      # l2-normalise latents and codebook rows before the look-up
    norm_groups: int = 32           # GroupNorm groups (LlamaGen: 32)
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        widths = {self.base_channels * m for m in self.channel_mult} | {self.base_channels}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ConfigError(
                f"tokenizer widths {bad} are not divisible by norm_groups={self.norm_groups}; "
                "change tokenizer.base_channels / channel_mult / norm_groups")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def from_params(cls, params: Mapping) -> "VQConfig":
        """Sizes from the `tokenizer:` section; in_channels from `data.channels`."""
        tok = params["tokenizer"]
        return cls(in_channels=params["data"]["channels"], base_channels=tok["base_channels"],
                   channel_mult=tuple(tok["channel_mult"]), num_res_blocks=tok["num_res_blocks"],
                   z_channels=tok["z_channels"], codebook_size=tok["codebook_size"],
                   codebook_dim=tok["codebook_dim"], l2_norm_codes=tok["l2_norm_codes"],
                   norm_groups=tok["norm_groups"], dropout=tok["dropout"])

    @classmethod
    def from_dict(cls, values: Mapping) -> "VQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(f"tokenizer config has unknown keys {unknown}; the checkpoint was written "
                                  "by a different arpg version, re-run `arpg train-tokenizer`")
        return cls(**values)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # 1x1 projection only where the width changes (LlamaGen's `nin_shortcut`)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x_BCHW)))  # [B, out, H, W]
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = x_BCHW if self.nin_shortcut is None else self.nin_shortcut(x_BCHW)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 conv projections)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        h = self.norm(x_BCHW)
        # explicit bmm in LlamaGen's order (not SDPA) so released weights reproduce to float rounding
        q_BLC = self.q(h).reshape(B, C, H * W).transpose(1, 2)
        k_BCL = self.k(h).reshape(B, C, H * W)
        v_BCL = self.v(h).reshape(B, C, H * W)
        attn_BLL = torch.softmax(torch.bmm(q_BLC, k_BCL) * C ** -0.5, dim=2)  # [B, query, key]
        out_BCL = torch.bmm(v_BCL, attn_BLL.transpose(1, 2))
        return x_BCHW + self.proj_out(out_BCL.reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        # asymmetric zero padding (right / bottom), as LlamaGen and taming do
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1)))  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))  # [B, C, 2H, 2W]


class Level(nn.Module):
    """One resolution level; attribute names give LlamaGen's keys (res / attn / down- or upsample)."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per res block
        self.resample_name = name if resample is not None else None
        if resample is not None:
            setattr(self, name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h if self.resample_name is None else getattr(self, self.resample_name)(h)


def _level(block_in: int, block_out: int, n_res: int, with_attn: bool, resample, name: str,
           groups: int, dropout: float) -> tuple[Level, int]:
    """n_res res blocks (the first block_in -> block_out), each followed by attention if with_attn,
    then `resample` (a module class, or None). Built in this order: it fixes the init draws."""
    res, attn = [], []
    for _ in range(n_res):
        res.append(ResnetBlock(block_in, block_out, groups, dropout))
        block_in = block_out
        if with_attn:
            attn.append(AttnBlock(block_in, groups))
    return Level(res, attn, resample(block_in) if resample is not None else None, name), block_in


def _mid(ch: int, groups: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(ch, ch, groups, dropout), AttnBlock(ch, groups),
                         ResnetBlock(ch, ch, groups, dropout))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g, p = cfg.base_channels, cfg.channel_mult, cfg.norm_groups, cfg.dropout
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.Sequential()
        block_in = ch
        last = len(mult) - 1
        for level, m in enumerate(mult):  # attention only at the lowest resolution
            block, block_in = _level(block_in, ch * m, cfg.num_res_blocks, level == last,
                                     Downsample if level != last else None, "downsample", g, p)
            self.conv_blocks.append(block)
        self.mid = _mid(block_in, g, p)
        self.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_blocks(self.conv_in(x_BCHW)))
        return self.conv_out(swish(self.norm_out(h)))  # [B, z, h, w]


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g, p = cfg.base_channels, cfg.channel_mult, cfg.norm_groups, cfg.dropout
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, g, p)
        self.conv_blocks = nn.Sequential()  # deepest level first
        last = len(mult) - 1
        for level in reversed(range(len(mult))):
            block, block_in = _level(block_in, ch * mult[level], cfg.num_res_blocks + 1, level == last,
                                     Upsample if level != 0 else None, "upsample", g, p)
            self.conv_blocks.append(block)
        self.norm_out = nn.GroupNorm(g, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, cfg.in_channels, 3, padding=1)

    def forward(self, z_BZhw: torch.Tensor) -> torch.Tensor:
        h = self.conv_blocks(self.mid(self.conv_in(z_BZhw)))
        return self.conv_out(swish(self.norm_out(h)))  # [B, C, H, W]


class Quantized(NamedTuple):
    z_q_BDhw: torch.Tensor      # quantised latents (straight-through gradient to the encoder)
    tokens_Bhw: torch.Tensor    # int64 code indices
    codebook_loss: torch.Tensor  # ||sg(z) - e||^2: moves the codes
    commit_loss: torch.Tensor    # ||z - sg(e)||^2 (unweighted): keeps the encoder near its codes


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.l2_norm_codes
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        # ring buffer of the most recent training codes (float, as in LlamaGen); -1 marks empty slots
        self.register_buffer("codebook_used", torch.full((USAGE_WINDOW,), -1.0))

    def codebook(self) -> torch.Tensor:
        weight_KD = self.embedding.weight
        return F.normalize(weight_KD, dim=-1) if self.l2_norm else weight_KD  # [K, D]

    def forward(self, z_BDhw: torch.Tensor) -> Quantized:
        B, D, h, w = z_BDhw.shape
        z_BhwD = z_BDhw.permute(0, 2, 3, 1)
        if self.l2_norm:
            z_BhwD = F.normalize(z_BhwD, dim=-1)
        e_KD = self.codebook()
        z_ND = z_BhwD.reshape(-1, D)
        # squared distance ||z||^2 + ||e||^2 - 2 z.e, the expansion LlamaGen uses (same argmin ties)
        dist_NK = z_ND.pow(2).sum(1, keepdim=True) + e_KD.pow(2).sum(1) - 2 * z_ND @ e_KD.t()
        tokens_N = dist_NK.argmin(dim=1)
        zq_BhwD = e_KD[tokens_N].view(B, h, w, D)
        codebook_loss = F.mse_loss(zq_BhwD, z_BhwD.detach())
        commit_loss = F.mse_loss(z_BhwD, zq_BhwD.detach())
        if self.training:
            self.record_usage(tokens_N)
        zq_BhwD = z_BhwD + (zq_BhwD - z_BhwD).detach()  # straight-through estimator
        return Quantized(zq_BhwD.permute(0, 3, 1, 2), tokens_N.view(B, h, w), codebook_loss, commit_loss)

    @torch.no_grad()
    def record_usage(self, tokens_N: torch.Tensor) -> None:
        n = min(tokens_N.numel(), USAGE_WINDOW)
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], tokens_N[-n:].to(self.codebook_used)]))

    @torch.no_grad()
    def usage_counts(self) -> torch.Tensor:
        """Per-code counts over the recent-usage window, int64 [K]."""
        used = self.codebook_used[self.codebook_used >= 0].long()
        return torch.bincount(used, minlength=self.embedding.num_embeddings)

    def lookup(self, tokens_Bhw: torch.Tensor) -> torch.Tensor:
        return self.codebook()[tokens_Bhw].permute(0, 3, 1, 2)  # [B, D, h, w]


class VQOutput(NamedTuple):
    recon_BCHW: torch.Tensor
    tokens_Bhw: torch.Tensor
    codebook_loss: torch.Tensor
    commit_loss: torch.Tensor
    z_BDhw: torch.Tensor  # pre-quantisation latents (after quant_conv): used for dead-code restarts


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        with torch.no_grad():  # LlamaGen's codebook init: U(-1/K, 1/K), then l2-normalised
            k = cfg.codebook_size
            self.quantize.embedding.weight.uniform_(-1.0 / k, 1.0 / k)
            if cfg.l2_norm_codes:
                self.quantize.embedding.weight.copy_(F.normalize(self.quantize.embedding.weight, dim=-1))

    def latents(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images_BCHW))  # [B, D, h, w]

    def decode_latents(self, z_q_BDhw: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q_BDhw))  # [B, C, H, W]

    def forward(self, images_BCHW: torch.Tensor) -> VQOutput:
        z_BDhw = self.latents(images_BCHW)
        q = self.quantize(z_BDhw)
        return VQOutput(self.decode_latents(q.z_q_BDhw), q.tokens_Bhw, q.codebook_loss, q.commit_loss, z_BDhw)

    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images [B, C, H, W] -> int64 tokens [B, H/f, W/f]."""
        return self.quantize(self.latents(images_BCHW)).tokens_Bhw

    def decode(self, tokens_Bhw: torch.Tensor) -> torch.Tensor:
        """int64 tokens [B, h, w] -> images [B, C, h*f, w*f], nominally in [-1, 1] (not clamped)."""
        return self.decode_latents(self.quantize.lookup(tokens_Bhw))


# --- checkpoints --------------------------------------------------------------------

TRAIN_COMMAND = "arpg train-tokenizer"  # writes tokenizer.pt and its training state
SIZES_FIX = ("make the tokenizer: sizes in the params file match the checkpoint "
             "(or point tokenizer.pretrained / the output dir at the right file)")


def read_tokenizer_checkpoint(path: str | Path, what: str = "tokenizer checkpoint",
                              written_by: str | None = None) -> dict:
    """A tokenizer file (LlamaGen's layout or ours) through the one checkpoint reader.

    `what` names it in messages; `written_by`: the command that made it, if the pipeline did
    (see `read_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found; run `{TRAIN_COMMAND}` or fix tokenizer.pretrained")
    blob = read_checkpoint(path, what, written_by=written_by)
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' state dict (expected LlamaGen's layout "
                              "torch.load(f)['model'] or arpg's tokenizer.pt)")
    return blob


def load_tokenizer(path: str | Path, cfg: VQConfig | None = None, *, what: str = "tokenizer checkpoint",
                   written_by: str | None = None) -> VQModel:
    """Build and strictly load a tokenizer on CPU (eval mode).

    arpg's tokenizer.pt carries its config; LlamaGen's files do not, so `cfg`
    must be given for them (for an arpg file, a given `cfg` must agree).
    `what` / `written_by` as for `read_tokenizer_checkpoint`.
    """
    blob = read_tokenizer_checkpoint(path, what, written_by)
    stored = VQConfig.from_dict(blob["config"]) if "config" in blob else None
    if stored is None and cfg is None:
        raise CheckpointError(f"{path} holds no tokenizer config (a LlamaGen checkpoint); pass the sizes "
                              "from the params file's tokenizer: section")
    if stored is not None and cfg is not None and stored != cfg:
        diff = {f.name: (getattr(stored, f.name), getattr(cfg, f.name)) for f in fields(VQConfig)
                if getattr(stored, f.name) != getattr(cfg, f.name)}
        raise CheckpointError(f"{path} was trained with different tokenizer sizes (checkpoint, params): {diff}; "
                              f"re-run `{TRAIN_COMMAND}` or restore the params")
    model = VQModel(cfg or stored)
    load_state_strict(model, blob["model"], f"{what} {path}", SIZES_FIX)
    return model.eval()


def tokenizer_payload(model: VQModel) -> dict:
    """What tokenizer.pt holds: LlamaGen's layout under 'model' plus our config."""
    return {"model": model.state_dict(), "config": asdict(model.config)}
