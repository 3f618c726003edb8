"""VQ tokenizer loops: training, encoding and reconstructing images, codebook statistics.
(The stage glue that reads params and writes the outputs: arpg/commands/train_tokenizer.py, tokenize.py.)

Training objective (all terms optional by weight, none needs downloaded weights):
  l1 * |x - x'| + l2 * (x - x')^2                      reconstruction
  + codebook_weight * (||sg(z) - e||^2 + beta * ||z - sg(e)||^2)   VQ-VAE codebook + commitment (beta 0.25)
  + adversarial_weight * hinge patch-GAN generator loss (from `adversarial_start` on)

Codebook usage. Codes live on the unit sphere in a low dimension (8): LlamaGen
showed that l2-normalised, low-dimensional codes keep most of a codebook alive
(cosine look-up, no norm collapse). On top of that, codes that no batch has
picked during the last `dead_code_every` steps are restarted onto random
encoder outputs of the current batch (the standard dead-code restart, as in
Jukebox / SoundStream): a short CPU run cannot wait for the commitment loss to
drag far-away codes in, and an unused code is wasted capacity of the token
vocabulary the generator must model.

Learning rate: linear warm-up over the first 5% of `max_steps`, then half-cosine
down to 10%. The budget is a step count, never wall-clock time, so the weights
are a function of the params alone (not of the machine's speed or load).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from arpg.checkpoint_io import load_state_strict
from arpg.config import NOT_RESULT_KEYS, section_values
from arpg.data.batches import EpochBatches
from arpg.data.pixels import from_uint8, to_uint8
from arpg.engine.image_metrics import psnr
from arpg.errors import CheckpointError
from arpg.lr_schedule import lr_by_progress, set_lr
from arpg.models.discriminator import PatchDiscriminator
from arpg.progress import Progress
from arpg.models.vq import TRAIN_COMMAND, VQConfig, VQModel, read_tokenizer_checkpoint
from arpg.utils import atomic_path, atomic_torch_save, make_generator, require_finite, seeded_global_rng

WARMUP_SHARE = 0.05
MIN_LR_SHARE = 0.1


@dataclass(frozen=True)
class TokenizerTrainConfig:
    batch_size: int
    lr: float
    weight_decay: float
    max_steps: int
    checkpoint_every: int
    log_every: int
    commit_beta: float
    codebook_weight: float
    l1_weight: float
    l2_weight: float
    adversarial_weight: float
    adversarial_start: int
    dead_code_every: int   # 0: no dead-code restarts
    seed: int

    @classmethod
    def from_params(cls, params: Mapping) -> "TokenizerTrainConfig":
        names = [k for k in cls.__dataclass_fields__ if k != "seed"]
        return cls(**section_values(params, "tokenizer", names), seed=params["seed"])

    def trajectory(self) -> dict:
        """The fields that determine the weights: a resume must match them exactly."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_RESULT_KEYS["tokenizer"]}


# --- codebook statistics ---------------------------------------------------------------

def codebook_stats(tokens: np.ndarray | torch.Tensor, codebook_size: int) -> dict:
    """Share of codes used at least once and perplexity exp(H) of the code histogram."""
    counts_K = torch.bincount(torch.as_tensor(np.asarray(tokens)).reshape(-1).long(), minlength=codebook_size)
    return _usage_from_counts(counts_K)


def _usage_from_counts(counts_K: torch.Tensor) -> dict:
    total = counts_K.sum().item()
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0, "codes_used": 0}
    p_K = counts_K.double() / total
    entropy = -(p_K[p_K > 0] * p_K[p_K > 0].log()).sum().item()
    used = int((counts_K > 0).sum())
    return {"usage": used / counts_K.numel(), "perplexity": math.exp(entropy), "codes_used": used}


@torch.no_grad()
def restart_dead_codes(model: VQModel, dead_K: torch.Tensor, z_BDhw: torch.Tensor, gen: torch.Generator) -> int:
    """Move every dead code onto a random encoder output of the batch; returns how many moved."""
    dead = dead_K.nonzero().flatten()
    if dead.numel() == 0:
        return 0
    z_ND = z_BDhw.permute(0, 2, 3, 1).reshape(-1, z_BDhw.shape[1])
    if model.config.l2_norm_codes:
        z_ND = F.normalize(z_ND, dim=-1)
    pick = torch.randint(z_ND.shape[0], (dead.numel(),), generator=gen)
    model.quantize.embedding.weight[dead.to(z_ND.device)] = z_ND[pick.to(z_ND.device)]
    return int(dead.numel())


# --- training ------------------------------------------------------------------------

def _adv_losses(disc: PatchDiscriminator, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge losses: (discriminator loss on detached fakes, generator loss)."""
    d_loss = 0.5 * (F.relu(1 - disc(real)).mean() + F.relu(1 + disc(fake.detach())).mean())
    g_loss = -disc(fake).mean()
    return d_loss, g_loss


@dataclass
class TokenizerResult:
    model: VQModel           # trained, eval mode, on the training device
    steps: int
    history: list[dict]      # one entry per log window


def train_tokenizer(vq_cfg: VQConfig, cfg: TokenizerTrainConfig, images_NCHW: torch.Tensor, device: torch.device,
                    *, state_path: Path, run=None, progress: bool = True) -> TokenizerResult:
    """Train the VQ tokenizer on uint8 images [N, C, H, W], resuming from (and checkpointing to)
    state_path. Call under `utils.deterministic_algorithms(device)`."""
    # nn.Module init can only draw from the global RNG: seeded inside a fork, nothing else is disturbed;
    # every draw during training (batches, flips, dead-code restarts) uses `gen`
    with seeded_global_rng(cfg.seed):
        model = VQModel(vq_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    disc = disc_opt = None
    if cfg.adversarial_weight > 0:
        disc = PatchDiscriminator(vq_cfg.in_channels).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = make_generator(cfg.seed)
    n = images_NCHW.shape[0]
    batches = EpochBatches(n, cfg.batch_size, lambda epoch: torch.randperm(n, generator=gen), drop_last=True,
                           key="tokenizer.batch_size", items="training images")
    step, history = 0, []

    if state_path.is_file():
        state = read_tokenizer_checkpoint(state_path, "tokenizer train state", TRAIN_COMMAND)
        fresh = "delete it to train from scratch"
        if (VQConfig.from_dict(state["config"]) != vq_cfg or state.get("trajectory") != cfg.trajectory()
                or bool(state.get("discriminator")) != (disc is not None)):
            raise CheckpointError(f"{state_path} was written with other tokenizer settings; {fresh}")
        load_state_strict(model, state["model"], str(state_path), fresh)
        opt.load_state_dict(state["optimizer"])
        if disc is not None:
            load_state_strict(disc, state["discriminator"], f"{state_path} (discriminator)", fresh)
            disc_opt.load_state_dict(state["disc_optimizer"])
        gen.set_state(state["stream"]["rng"])
        batches.load_state_dict(state["stream"])
        step, history = int(state["step"]), list(state["history"])
        print(f"resuming tokenizer training at step {step}")

    def save_state() -> None:
        atomic_torch_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(vq_cfg),
            "trajectory": cfg.trajectory(),
            "discriminator": disc.state_dict() if disc is not None else None,
            "disc_optimizer": disc_opt.state_dict() if disc is not None else None,
            "stream": {"rng": gen.get_state(), **batches.state_dict()}, "step": step, "history": history,
        }, state_path)

    model.train()
    bar = Progress(cfg.max_steps, "train-tokenizer", initial=step, enabled=progress)
    window = []
    while step < cfg.max_steps:
        lr = set_lr(opt.param_groups + (disc_opt.param_groups if disc_opt else []),
                    lr_by_progress(step / cfg.max_steps, peak=cfg.lr, warmup_share=WARMUP_SHARE,
                                   floor_share=MIN_LR_SHARE))
        idx_B = batches.next()  # [B]
        flip_B = torch.rand(cfg.batch_size, generator=gen) < 0.5  # [B]: the tokenizer also sees flipped images
        pixels = images_NCHW[idx_B]  # [B, C, H, W] uint8
        pixels = torch.where(flip_B[:, None, None, None], pixels.flip(-1), pixels)
        x_BCHW = from_uint8(pixels).to(device)

        out = model(x_BCHW)
        err = out.recon_BCHW - x_BCHW
        l1, l2 = err.abs().mean(), err.pow(2).mean()
        vq = out.codebook_loss + cfg.commit_beta * out.commit_loss
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.codebook_weight * vq
        terms = {"l1": l1.item(), "l2": l2.item(), "codebook": out.codebook_loss.item(),
                 "commit": out.commit_loss.item()}
        adversarial_on = disc is not None and step >= cfg.adversarial_start
        if adversarial_on:
            d_loss, g_loss = _adv_losses(disc, x_BCHW, out.recon_BCHW)
            loss = loss + cfg.adversarial_weight * g_loss
            terms |= {"g_adv": g_loss.item(), "d_loss": d_loss.item()}
        # a diverged step is never applied: the state file keeps the last good checkpoint
        require_finite(loss.item(), "tokenizer loss", step + 1, "lower tokenizer.lr", state_path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if adversarial_on:
            # the generator step also filled the discriminator's grads: clear them first
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        step += 1
        restarted = 0
        if cfg.dead_code_every and step % cfg.dead_code_every == 0:
            dead_K = model.quantize.usage_counts() == 0
            restarted = restart_dead_codes(model, dead_K, out.z_BDhw, gen)
        window.append(terms | {"loss": loss.item()})
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            metrics = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
            with torch.no_grad():
                metrics["batch_psnr"] = psnr(to_uint8(out.recon_BCHW.detach().cpu()), pixels).mean().item()
            window_usage = _usage_from_counts(model.quantize.usage_counts().cpu())
            metrics |= {"lr": lr, "usage_window": window_usage["usage"],
                        "perplexity_window": window_usage["perplexity"], "codes_restarted": restarted}
            history.append({"step": step, **metrics})
            window = []
            bar.report(loss=metrics["loss"], psnr=round(metrics["batch_psnr"], 1),
                       usage=round(metrics["usage_window"], 3))
            if run is not None:
                run.log_metrics(metrics, step)
        if step % cfg.checkpoint_every == 0:
            save_state()
    bar.close()
    save_state()
    return TokenizerResult(model.eval(), step, history)


# --- tokenization --------------------------------------------------------------------

@torch.inference_mode()
def encode_pixels(model: VQModel, pixels_NCHW: torch.Tensor, batch_size: int, device,
                  flip: bool = False) -> torch.Tensor:
    """uint8 images [N, C, H, W] -> int64 tokens [N, h, w] (optionally of the horizontally flipped images)."""
    chunks = []
    for start in range(0, pixels_NCHW.shape[0], batch_size):
        pixels = pixels_NCHW[start:start + batch_size]
        if flip:
            pixels = pixels.flip(-1)
        chunks.append(model.encode(from_uint8(pixels).to(device)).cpu())  # [b, h, w]
    return torch.cat(chunks)


@torch.inference_mode()
def reconstruct_pixels(model: VQModel, pixels_NCHW: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """uint8 images -> uint8 reconstructions through encode -> tokens -> decode."""
    chunks = []
    for start in range(0, pixels_NCHW.shape[0], batch_size):
        tokens_Bhw = model.encode(from_uint8(pixels_NCHW[start:start + batch_size]).to(device))
        chunks.append(to_uint8(model.decode(tokens_Bhw)).cpu())  # [b, C, H, W]
    return torch.cat(chunks)


def token_dtype(codebook_size: int):
    return np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32


def save_grid(originals_NCHW: torch.Tensor, recons_NCHW: torch.Tensor, path: Path, columns: int = 16,
              scale: int = 2) -> None:
    """PNG grid: row pairs of originals (top) over their reconstructions (bottom), 2 px gaps."""
    from PIL import Image

    n, C, H, W = originals_NCHW.shape
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    gap = 2
    canvas = np.full((rows * 2 * (H + gap) + gap, columns * (W + gap) + gap, C), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        x0 = gap + c * (W + gap)
        for k, img in enumerate((originals_NCHW[i], recons_NCHW[i])):
            y0 = gap + (2 * r + k) * (H + gap)
            canvas[y0:y0 + H, x0:x0 + W] = img.permute(1, 2, 0).numpy()
    image = Image.fromarray(canvas[..., 0] if C == 1 else canvas)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    with atomic_path(path, ".png") as tmp:
        image.save(tmp)
