"""Training engine for the ARPG model and the raster-order baseline (`arpg train`).

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
* everything else (model, optimizer, EMA, step) is in the atomic state file;
* the budget is `max_steps`, never wall-clock time: a slow or loaded machine trains the same weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from arpg.checkpoint_io import read_checkpoint
from arpg.errors import CheckpointError, ConfigError, DataError
from arpg.utils import atomic_torch_save, deterministic_algorithms, make_generator, require_finite

KINDS = ("arpg", "raster")

# independent seed streams derived from the base seed
STREAM_INIT, STREAM_DATA, STREAM_SAMPLES, STREAM_DROPOUT = range(4)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (SeedSequence mixes them; nearby keys give unrelated streams)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


# --------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    batch_size: int = 128         # global batch per optimizer step (all ranks x all micro-steps)
    grad_accum: int = 1           # micro-steps per optimizer step
    lr: float = 1e-3
    min_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_steps: int = 1500
    grad_clip: float = 1.0        # 0: off
    class_dropout: float = 0.1
    ema: float = 0.0              # EMA decay; 0: off
    precision: str = "fp32"       # fp32 | bf16 (autocast, CUDA only)
    compile: bool = False         # torch.compile (CUDA only)
    checkpoint_every: int = 200
    log_every: int = 50
    seed: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "TrainConfig":
        t = params["train"]
        values = {f.name: t[f.name] for f in fields(cls) if f.name in t}
        values["betas"] = tuple(float(b) for b in t["betas"])
        return cls(**values, seed=int(params["seed"]))

    def trajectory(self) -> dict[str, Any]:
        """The fields that determine the weights: a resume must match them exactly."""
        skip = {"checkpoint_every", "log_every", "compile"}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in skip}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to `lr` over
    `warmup_steps` steps, then half-cosine down to `min_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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


class EMA:
    """Exponential moving average of a model's state (parameters averaged, buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value, 1.0 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise CheckpointError("EMA state does not match the model's keys; delete the train state to restart")
        for key, value in state.items():
            self.shadow[key].copy_(value)


# --------------------------------------------------------------------------- data


class TokenData:
    """Token grids (memory-mapped or in memory) flattened to raster sequences, plus labels."""

    def __init__(self, grids: list[np.ndarray], labels: list[np.ndarray], *, grid_size: int,
                 codebook_size: int, num_classes: int, names: list[str] | None = None):
        names = names or [f"part {i}" for i in range(len(grids))]
        for grid, lab, name in zip(grids, labels, names):
            if grid.ndim != 3 or grid.shape[1:] != (grid_size, grid_size):
                raise DataError(f"{name} token grids have shape {tuple(grid.shape)}, expected [N, {grid_size}, "
                                f"{grid_size}] (data.resolution / tokenizer downsampling); re-run `arpg tokenize`")
            if len(lab) != len(grid):
                raise DataError(f"{name}: {len(grid)} token grids but {len(lab)} labels; re-run `arpg tokenize`")
            if len(grid) and (int(grid.min()) < 0 or int(grid.max()) >= codebook_size):
                raise DataError(f"{name} tokens span [{int(grid.min())}, {int(grid.max())}], outside the codebook "
                                f"[0, {codebook_size}); the tokens were made by a different tokenizer: re-run "
                                "`arpg tokenize` or fix tokenizer.codebook_size")
            if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
                raise DataError(f"{name} labels span [{int(lab.min())}, {int(lab.max())}], outside "
                                f"[0, {num_classes}); fix data.num_classes")
        self.grids = grids
        self.labels = [np.asarray(lab, dtype=np.int64) for lab in labels]
        self.offsets = np.cumsum([0] + [len(g) for g in grids])
        self.seq_len = grid_size * grid_size

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, idx_B: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens_BN (int64, raster order), labels_B (int64) of the given global indices."""
        tokens_BN = np.empty((len(idx_B), self.seq_len), dtype=np.int64)
        labels_B = np.empty(len(idx_B), dtype=np.int64)
        part_B = np.searchsorted(self.offsets, idx_B, side="right") - 1
        for part, (grid, lab) in enumerate(zip(self.grids, self.labels)):
            sel = np.nonzero(part_B == part)[0]
            if len(sel):
                local = idx_B[sel] - self.offsets[part]
                tokens_BN[sel] = np.asarray(grid[local]).reshape(len(sel), -1)
                labels_B[sel] = lab[local]
        return torch.from_numpy(tokens_BN), torch.from_numpy(labels_B)


class BatchOrder:
    """Global batch indices of optimizer step s: a pure function of (seed, s).

    Each epoch is a fresh seeded permutation; its last incomplete batch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise DataError(f"{n} training sequences cannot fill one batch of train.batch_size={batch_size}; "
                            "lower train.batch_size or use more data")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = make_generator(derive_seed(self.seed, STREAM_DATA, epoch))
            self._perm = torch.randperm(self.n, generator=gen).numpy()
            self._epoch = epoch
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size]


def draw_conditioning(labels_B: torch.Tensor, seq_len: int, kind: str, class_dropout: float,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class dropout (label -> -1, the null class) and, for ARPG, one random permutation per sample."""
    drop_B = torch.rand(labels_B.shape[0], generator=gen) < class_dropout  # [B]
    labels_B = torch.where(drop_B, torch.full_like(labels_B, -1), labels_B)
    if kind != "arpg":
        return labels_B, None
    orders_BN = torch.argsort(torch.rand(labels_B.shape[0], seq_len, generator=gen), dim=1)  # [B, N]
    return labels_B, orders_BN


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    from arpg.utils import resolve_device

    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    import torch.distributed as dist

    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


class LossModule(nn.Module):
    """forward() = the model's training loss, so DDP's hooks and torch.compile see the whole step."""

    def __init__(self, model: nn.Module, kind: str):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, tokens_BN, labels_B, orders_BN=None):
        if self.kind == "arpg":
            return self.model.loss(tokens_BN, labels_B, orders_BN)
        return self.model.loss(tokens_BN, labels_B)


# --------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None      # mean loss of the last logging window
    tokens_per_s: float           # this process's loop (the log and MLflow; not a result)
    wall_s: float                 # this process's training-loop wall time
    sampling_state: dict          # EMA weights when enabled, else the trained weights


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """bf16 autocast on CUDA only; a CPU request falls back to fp32 with a note (CPU bf16 is slow
    and would break the bit-exact resume guarantee's fp32 reference)."""
    if cfg.precision != "bf16":
        return False
    if device.type != "cuda":
        print("note: train.precision=bf16 applies on CUDA only; training in fp32 on", device.type)
        return False
    return True


def _model_config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return asdict(config) if is_dataclass(config) else None


def load_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return read_checkpoint(path, "train state", written_by="arpg train")


def _check_resumable(state: dict, path: Path, cfg: TrainConfig, kind: str, name: str, model: nn.Module) -> None:
    wanted = {"kind": kind, "name": name, "model_config": _model_config(model), "trajectory": cfg.trajectory()}
    for key, want in wanted.items():
        have = state.get(key)
        if have != want:
            if isinstance(have, dict) and isinstance(want, dict):
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                what = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in diff)
            else:
                what = f"{have!r} -> {want!r}"
            raise CheckpointError(f"train state {path} belongs to a different run ({key} {what}); "
                                  "delete it to start over, or restore the params it was written with")


def train(model: nn.Module, kind: str, data: TokenData, cfg: TrainConfig, *, state_path: Path,
          device: torch.device, dist_info: DistInfo = DistInfo(), tracker=None, name: str = "",
          progress: bool = True) -> TrainResult:
    """Train `model` in place (resuming from `state_path` if it exists) and return the result.

    Rank 0 writes the state every `checkpoint_every` steps and when it stops."""
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
    shards = cfg.grad_accum * dist_info.world_size
    if cfg.batch_size % shards:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be divisible by train.grad_accum x processes "
                          f"= {cfg.grad_accum} x {dist_info.world_size}; change train.batch_size")
    micro = cfg.batch_size // shards
    state_path = Path(state_path)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    gen = make_generator(derive_seed(cfg.seed, STREAM_SAMPLES))
    step, tokens_seen, last_loss = 0, 0, None
    window_sum, window_count = torch.zeros((), dtype=torch.float64, device=device), 0  # loss since last log

    state = load_state(state_path)
    if state is not None:
        _check_resumable(state, state_path, cfg, kind, name, model)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"train state {state_path} does not fit the model ({exc}); delete it") from exc
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        last_loss, window_count = state["last_loss"], state["window"][1]
        window_sum.fill_(state["window"][0])
        if dist_info.is_main and progress:
            print(f"resuming {name or kind} from {state_path} at step {step}")
    ema = None
    if cfg.ema > 0 and dist_info.is_main:  # only rank 0 saves, so only rank 0 averages
        ema = EMA(model, cfg.ema)
        if state is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
    del state

    engine: nn.Module = LossModule(model, kind)
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        engine = DDP(engine, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        if device.type == "cuda":
            engine = torch.compile(engine)
        elif dist_info.is_main:
            print("note: train.compile applies on CUDA only; running eagerly on", device.type)
    bf16 = use_bf16(cfg, device)

    order = BatchOrder(len(data), cfg.batch_size, cfg.seed)
    seq_len = data.seq_len

    def save_state() -> None:
        if not dist_info.is_main:
            return
        atomic_torch_save({
            "kind": kind, "name": name, "model_config": _model_config(model), "trajectory": cfg.trajectory(),
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "generator": gen.get_state(),
            "tokens_seen": tokens_seen, "last_loss": last_loss,
            "window": (float(window_sum), window_count),
        }, state_path)

    def flush_window() -> float | None:
        nonlocal window_count
        if window_count == 0:
            return last_loss
        total = torch.stack([window_sum, torch.tensor(float(window_count), dtype=torch.float64, device=device)])
        if dist_info.enabled:
            import torch.distributed as dist

            dist.all_reduce(total)
        window_sum.zero_()
        window_count = 0
        return float(total[0] / total[1])

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {name or kind}", unit="step",
               disable=not (dist_info.is_main and progress), dynamic_ncols=True)
    tick, tick_tokens = time.perf_counter(), tokens_seen
    loop_start, tokens_at_start = time.perf_counter(), tokens_seen
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens_BN, labels_B = data.batch(order.indices(step))  # [B, N], [B] (global batch)
        labels_B, orders_BN = draw_conditioning(labels_B, seq_len, kind, cfg.class_dropout, gen)
        step_loss = torch.zeros((), device=device)
        for a in range(cfg.grad_accum):
            shard = slice((a * dist_info.world_size + dist_info.rank) * micro,
                          (a * dist_info.world_size + dist_info.rank + 1) * micro)
            args = [tokens_BN[shard].to(device), labels_B[shard].to(device)]  # [b, N], [b]
            if orders_BN is not None:
                args.append(orders_BN[shard].to(device))  # [b, N]
            sync = a == cfg.grad_accum - 1 or not dist_info.enabled
            with (contextlib.nullcontext() if sync else engine.no_sync()), \
                    torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                          device_type=device.type):
                torch.manual_seed(derive_seed(cfg.seed, STREAM_DROPOUT, step, a, dist_info.rank))
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = engine(*args)
                (loss / cfg.grad_accum).backward()
            step_loss += loss.detach().float() / cfg.grad_accum
        # The norm of the all-reduced gradients is the same on every rank, so all ranks stop together
        # when any rank's loss diverged; the step is never applied, and the state file keeps the last
        # good checkpoint. An infinite max_norm only measures (the clip factor is exactly 1).
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        require_finite(float(step_loss) + float(grad_norm), f"{name or kind} training loss (or its gradient)",
                       step + 1, "lower train.lr or raise train.warmup_steps", state_path)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        step += 1
        tokens_seen += cfg.batch_size * seq_len
        window_sum += step_loss
        window_count += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            last_loss = flush_window()
            now = time.perf_counter()
            tok_s = (tokens_seen - tick_tokens) / max(now - tick, 1e-9)
            tick, tick_tokens = now, tokens_seen
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if tracker is not None and dist_info.is_main:
                metrics = {"loss": last_loss, "lr": lr, "tokens_per_s": tok_s}
                metrics["grad_norm"] = float(grad_norm)
                tracker.log_metrics(metrics, step)
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            save_state()
    bar.close()
    elapsed = time.perf_counter() - loop_start
    last_loss = flush_window()
    save_state()
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()  # the state on disk is complete before any rank returns
    sampling = {k: v.detach().clone() for k, v in (ema.state_dict() if ema is not None else model.state_dict()).items()}
    return TrainResult(steps=step, final_loss=last_loss, tokens_per_s=(tokens_seen - tokens_at_start) / max(elapsed, 1e-9),
                       wall_s=elapsed, sampling_state=sampling)


# --------------------------------------------------------------------------- the stage


def codebook_size(params: Mapping[str, Any]) -> int:
    """Vocabulary of the token grids: the tokenizer's codebook (the data check catches a mismatch)."""
    return int(params["tokenizer"]["codebook_size"])


def model_name(params: Mapping[str, Any], kind: str) -> str:
    return params["train"][f"{kind}_model"]


def build_study_model(params: Mapping[str, Any], kind: str, **overrides) -> nn.Module:
    """The registry model named by train.<kind>_model, initialised from a seed of its own."""
    from arpg.config import token_grid
    from arpg.models.registry import build_model

    name = model_name(params, kind)
    model = build_model(name, codebook_size=codebook_size(params), num_classes=params["data"]["num_classes"],
                        grid_size=token_grid(params), generator=make_generator(derive_seed(params["seed"], STREAM_INIT)),
                        **overrides)
    _check_kind(model, kind, f"train.{kind}_model", name)
    return model


def _check_kind(model: nn.Module, kind: str, key: str, name: str) -> None:
    from arpg.models.arpg import ARPG
    from arpg.models.raster import RasterGPT

    want = {"arpg": ARPG, "raster": RasterGPT}[kind]
    if not isinstance(model, want):
        raise ConfigError(f"{key}={name!r} builds a {type(model).__name__}, but --model {kind} needs a "
                          f"{want.__name__}; pick a {'ARPG-*' if kind == 'arpg' else 'LlamaGen-*'} size")


def load_study_data(params: Mapping[str, Any]) -> TokenData:
    from arpg.config import token_grid
    from arpg.data.arrays import load_token_labels, load_tokens

    layout = params.layout
    splits = ["train", "train_flip"] if params["train"]["use_flipped"] else ["train"]
    return TokenData([load_tokens(layout, s) for s in splits], [load_token_labels(layout, s) for s in splits],
                     grid_size=token_grid(params), codebook_size=codebook_size(params),
                     num_classes=params["data"]["num_classes"], names=[f"{s} tokens" for s in splits])


def _write_outputs(params, kind: str, model: nn.Module, metrics: dict, tracker) -> None:
    from arpg.models.checkpoint import save_generator
    from arpg.utils import write_json

    layout = params.layout
    save_generator(model, layout.model_checkpoint(kind), model_name(params, kind))
    write_json(layout.model_metrics(kind), metrics)
    tracker.log_artifact(layout.model_metrics(kind))
    print(f"wrote {layout.model_checkpoint(kind)} and {layout.model_metrics(kind)}")


def import_pretrained(params, kind: str, tracker) -> dict:
    """Skip training: strictly load the configured released checkpoint, re-save it in our layout."""
    from arpg.config import token_grid
    from arpg.models.checkpoint import load_generator
    from arpg.utils import require_file

    key = f"train.{kind}_pretrained"
    path = require_file(params["train"][f"{kind}_pretrained"], f"{key} checkpoint",
                        f"put the file there or set {key}: null to train the model")
    name = model_name(params, kind)
    model = load_generator(path, name, codebook_size=codebook_size(params),
                           num_classes=params["data"]["num_classes"], grid_size=token_grid(params), what=key)
    _check_kind(model, kind, f"train.{kind}_model", name)
    metrics = {"model": name, "kind": kind, "pretrained": str(path), "steps": 0,
               "parameters": sum(p.numel() for p in model.parameters()),
               "uniform_loss": math.log(codebook_size(params))}
    print(f"{kind}: using pretrained weights {path} ({name}); training skipped")
    _write_outputs(params, kind, model, metrics, tracker)
    return metrics


def run_train(params, kind: str) -> dict | None:
    """`arpg train --model <kind>`: train (or import) one study model; returns the metrics on rank 0."""
    from arpg.tracking import NullRun, stage_run

    info, device = init_distributed(params["device"])
    name = model_name(params, kind)
    cfg = TrainConfig.from_params(params)
    run_params = {"model": kind, "name": name, "seed": cfg.seed, "train_steps": cfg.max_steps,
                  "batch_size": cfg.batch_size, "lr": cfg.lr, "world_size": info.world_size}
    tracking = (stage_run(params, "train", run_name=f"train-{kind}", run_params=run_params)
                if info.is_main else contextlib.nullcontext(NullRun()))
    try:
        with tracking as tracker:
            if params["train"][f"{kind}_pretrained"]:
                return import_pretrained(params, kind, tracker) if info.is_main else None
            data = load_study_data(params)
            model = build_study_model(params, kind)
            n_params = sum(p.numel() for p in model.parameters())
            if info.is_main:
                print(f"{kind}: {name}, {n_params:,} parameters, {len(data):,} sequences of {data.seq_len} "
                      f"tokens, {info.world_size} process(es) on {device}")
            with deterministic_algorithms(device):
                result = train(model, kind, data, cfg, state_path=params.layout.model_state(kind), device=device,
                               dist_info=info, tracker=tracker, name=name)
            if not info.is_main:
                return None
            uniform = math.log(codebook_size(params))
            model.load_state_dict(result.sampling_state)
            # results only: speed goes to the log and MLflow, so the file is the same on any machine
            metrics = {"model": name, "kind": kind, "parameters": n_params, "steps": result.steps,
                       "final_loss": result.final_loss, "uniform_loss": uniform,
                       "world_size": info.world_size, "weights": "ema" if cfg.ema > 0 else "final",
                       "ema_decay": cfg.ema, "precision": "bf16" if cfg.precision == "bf16" and device.type == "cuda" else "fp32"}
            tracker.log_metrics({"final_loss": result.final_loss, "uniform_loss": uniform,
                                 "train_tokens_per_s": result.tokens_per_s, "train_wall_s": result.wall_s},
                                result.steps)
            final = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
            print(f"{kind}: {result.steps} steps, final loss {final} vs "
                  f"uniform-guess ln({codebook_size(params)}) = {uniform:.4f}; {result.tokens_per_s:,.0f} tokens/s, "
                  f"{result.wall_s:.1f} s; sampling weights: {metrics['weights']}")
            _write_outputs(params, kind, model, metrics, tracker)
            return metrics
    finally:
        if info.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
