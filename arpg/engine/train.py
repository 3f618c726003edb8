"""Training loop of the ARPG model and the raster-order baseline (the stage: arpg/commands/train.py).

Determinism contract (CPU, fp32): the weights after step s are a pure function of
(seed, params, data, s), whatever the number of processes, kills and restarts:

* data order: epoch e is `randperm(N)` from a generator seeded by (seed, DATA, e);
  step s takes the s-th full global batch of that stream (so a resume needs no state);
* per-sample permutations and class dropout for the *global* batch come from one
  generator whose state is checkpointed; every rank draws the same values and keeps
  its slice, so 2 ranks x B/2 see exactly what 1 rank x B sees;
* nn.Dropout inside the model can only use the global RNG, so each micro-step runs
  inside `fork_rng` seeded from (seed, DROPOUT, step, micro, rank): no global state
  leaks and none has to be saved;
* everything else (model, optimizer, EMA, step) is in the atomic state file (train_state.py);
* the budget is `max_steps`, never wall-clock time: a slow or loaded machine trains the same weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from arpg.config import NOT_RESULT_KEYS, section_values
from arpg.data.batches import EpochBatches
from arpg.data.tokens import TokenData
from arpg.decoders import decoder
from arpg.dist import DistInfo, barrier
from arpg.engine.ema import EMA
from arpg.engine.train_state import restore, run_identity, save_state
from arpg.errors import ConfigError
from arpg.lr_schedule import lr_by_step, set_lr
from arpg.progress import Progress
from arpg.utils import derive_seed, make_generator, require_finite, seeded_global_rng


# independent seed streams derived from the base seed: derive_seed(seed, STREAM_..., ...)
STREAM_INIT, STREAM_DATA, STREAM_SAMPLES, STREAM_DROPOUT = range(4)


@dataclass
class TrainConfig:
    """The `train:` section (its defaults live in params.yaml only)."""

    batch_size: int               # global batch per optimizer step (all ranks x all micro-steps)
    grad_accum: int               # micro-steps per optimizer step
    lr: float
    min_lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    max_steps: int
    grad_clip: float              # 0: off
    class_dropout: float
    ema: float                    # EMA decay; 0: off
    precision: str                # fp32 | bf16 (autocast, CUDA only)
    compile: bool                 # torch.compile (CUDA only)
    checkpoint_every: int
    log_every: int
    seed: int

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "TrainConfig":
        values = section_values(params, "train", [f.name for f in fields(cls) if f.name != "seed"])
        values["betas"] = tuple(float(b) for b in values["betas"])
        return cls(**values, seed=int(params["seed"]))

    def trajectory(self) -> dict[str, Any]:
        """The fields that determine the weights: a resume must match them exactly."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k not in NOT_RESULT_KEYS["train"]}

    def lr_at(self, step: int) -> float:
        return lr_by_step(step, peak=self.lr, floor=self.min_lr, warmup_steps=self.warmup_steps,
                          max_steps=self.max_steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the release: decay on every >= 2-D weight (linears and the embedding
    table), none on 1-D tensors (RMSNorm scales, biases if any)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def token_batches(n: int, cfg: TrainConfig) -> EpochBatches:
    """Global batch indices; epoch e's order is a pure function of (seed, e), so any step's batch is known."""
    def permutation(epoch: int) -> torch.Tensor:
        return torch.randperm(n, generator=make_generator(derive_seed(cfg.seed, STREAM_DATA, epoch)))

    return EpochBatches(n, cfg.batch_size, permutation, drop_last=True, key="train.batch_size",
                        items="training sequences")


def draw_conditioning(labels_B: torch.Tensor, seq_len: int, decoder_name: str, class_dropout: float,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class dropout (label -> -1, the null class) and, for a parallel decoder, one random permutation
    per sample (its training order)."""
    drop_B = torch.rand(labels_B.shape[0], generator=gen) < class_dropout  # [B]
    labels_B = torch.where(drop_B, torch.full_like(labels_B, -1), labels_B)
    if not decoder(decoder_name).parallel:
        return labels_B, None
    orders_BN = torch.argsort(torch.rand(labels_B.shape[0], seq_len, generator=gen), dim=1)  # [B, N]
    return labels_B, orders_BN


class LossModule(nn.Module):
    """forward() = the model's training loss, so DDP's hooks and torch.compile see the whole step."""

    def __init__(self, model: nn.Module, decoder_name: str):
        super().__init__()
        self.model, self.parallel = model, decoder(decoder_name).parallel

    def forward(self, tokens_BN, labels_B, orders_BN=None):
        if self.parallel:  # trained on the random orders of draw_conditioning
            return self.model.loss(tokens_BN, labels_B, orders_BN)
        return self.model.loss(tokens_BN, labels_B)


def loss_engine(model: nn.Module, decoder_name: str, cfg: TrainConfig, device: torch.device,
                info: DistInfo) -> nn.Module:
    """The loss module, wrapped in DDP under torchrun and compiled when asked (CUDA only)."""
    engine: nn.Module = LossModule(model, decoder_name)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        engine = DDP(engine, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        if device.type == "cuda":
            engine = torch.compile(engine)
        elif info.is_main:
            print("note: train.compile applies on CUDA only; running eagerly on", device.type)
    return engine


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on CUDA only; a CPU request falls back to fp32 with a note (CPU bf16 is slow
    and would break the bit-exact resume guarantee's fp32 reference)."""
    if cfg.precision != "bf16":
        return False
    if device.type != "cuda":
        print("note: train.precision=bf16 applies on CUDA only; training in fp32 on", device.type)
        return False
    return True


def micro_batch(decoder_name: str, cfg: TrainConfig, info: DistInfo) -> int:
    """Samples per micro-step on this rank: the global batch over grad_accum x processes."""
    decoder(decoder_name)  # a registered decoder, or an error naming those that are
    shards = cfg.grad_accum * info.world_size
    if cfg.batch_size % shards:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be divisible by train.grad_accum x processes "
                          f"= {cfg.grad_accum} x {info.world_size}; change train.batch_size")
    return cfg.batch_size // shards


def accumulate_gradients(engine: nn.Module, batch: list, micro: int, cfg: TrainConfig, step: int,
                         info: DistInfo, device: torch.device, bf16: bool) -> torch.Tensor:
    """Forward and backward of this rank's `micro`-sample slices of the global `batch` ([tokens_BN,
    labels_B] plus orders_BN for ARPG); gradients all-reduce on the last. Returns this rank's mean loss."""
    step_loss = torch.zeros((), device=device)
    for a in range(cfg.grad_accum):
        first = (a * info.world_size + info.rank) * micro
        args = [t[first:first + micro].to(device) for t in batch]  # [b, N], [b] (, [b, N])
        sync = a == cfg.grad_accum - 1 or not info.enabled
        with (contextlib.nullcontext() if sync else engine.no_sync()), \
                seeded_global_rng(derive_seed(cfg.seed, STREAM_DROPOUT, step, a, info.rank), device):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = engine(*args)
            (loss / cfg.grad_accum).backward()
        step_loss += loss.detach().float() / cfg.grad_accum
    return step_loss


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None      # mean loss of the last logging window
    tokens_per_s: float           # this process's loop (the log and MLflow; not a result)
    wall_s: float                 # this process's training-loop wall time
    sampling_state: dict          # EMA weights when enabled, else the trained weights


def train(model: nn.Module, decoder_name: str, data: TokenData, cfg: TrainConfig, *, state_path: Path,
          device: torch.device, dist_info: DistInfo = DistInfo(), tracker=None, name: str = "",
          progress: bool = True) -> TrainResult:
    """Train `model` in place (resuming from `state_path` if it exists) and return the result.

    Rank 0 writes the state every `checkpoint_every` steps and when it stops."""
    micro = micro_batch(decoder_name, cfg, dist_info)
    state_path, main = Path(state_path), dist_info.is_main
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    gen = make_generator(derive_seed(cfg.seed, STREAM_SAMPLES))  # conditioning of the global batch
    identity = run_identity(decoder_name, name, model, cfg.trajectory())
    run, ema_state = restore(state_path, identity, model, optimizer, gen, device, verbose=main and progress)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 and main else None  # only rank 0 saves, so only rank 0 averages
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    engine = loss_engine(model, decoder_name, cfg, device, dist_info)
    bf16 = use_bf16(cfg, device)
    batches = token_batches(len(data), cfg)
    batches.seek(run.step)

    bar = Progress(cfg.max_steps, f"train {name or decoder_name}", initial=run.step, enabled=main and progress)
    tick, tick_tokens = time.perf_counter(), run.tokens_seen
    loop_start, tokens_at_start = time.perf_counter(), run.tokens_seen
    while run.step < cfg.max_steps:
        lr = set_lr(optimizer.param_groups, cfg.lr_at(run.step))
        tokens_BN, labels_B = data.batch(batches.next().numpy())  # [B, N], [B] (global batch)
        labels_B, orders_BN = draw_conditioning(labels_B, data.seq_len, decoder_name, cfg.class_dropout, gen)
        batch = [tokens_BN, labels_B] + ([orders_BN] if orders_BN is not None else [])
        step_loss = accumulate_gradients(engine, batch, micro, cfg, run.step, dist_info, device, bf16)
        # The norm of the all-reduced gradients is the same on every rank, so all ranks stop together
        # when any rank's loss diverged; the step is never applied, and the state file keeps the last
        # good checkpoint. An infinite max_norm only measures (the clip factor is exactly 1).
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        require_finite(float(step_loss) + float(grad_norm), f"{name or decoder_name} training loss (or its gradient)",
                       run.step + 1, "lower train.lr or raise train.warmup_steps", state_path)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        run.advance(step_loss, cfg.batch_size * data.seq_len)
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
            loss = run.flush_window(dist_info)
            now = time.perf_counter()
            tok_s = (run.tokens_seen - tick_tokens) / max(now - tick, 1e-9)
            tick, tick_tokens = now, run.tokens_seen
            bar.report(loss=loss, lr=lr, tok_s=round(tok_s))
            if tracker is not None and main:
                tracker.log_metrics({"loss": loss, "lr": lr, "tokens_per_s": tok_s,
                                     "grad_norm": float(grad_norm)}, run.step)
        if run.step % cfg.checkpoint_every == 0 and run.step < cfg.max_steps and main:
            save_state(state_path, identity, model, optimizer, ema, gen, run)
    bar.close()
    elapsed = time.perf_counter() - loop_start
    run.flush_window(dist_info)
    if main:
        save_state(state_path, identity, model, optimizer, ema, gen, run)
    barrier(dist_info)  # the state on disk is complete before any rank returns
    weights = ema.state_dict() if ema is not None else model.state_dict()
    return TrainResult(steps=run.step, final_loss=run.last_loss,
                       tokens_per_s=(run.tokens_seen - tokens_at_start) / max(elapsed, 1e-9), wall_s=elapsed,
                       sampling_state={k: v.detach().clone() for k, v in weights.items()})
