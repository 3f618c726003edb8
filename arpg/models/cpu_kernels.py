"""The linear kernel decoding runs on a CPU: plain or prepacked (oneDNN), fp32 or bf16.

Decoding is a few rows per step through every weight of the model (one token per sample per step
in raster order, a few in ARPG), so how the linear layers' weights are laid out and stored decides
its speed on a CPU. Four kernels:

  fp32-plain   nn.Linear as it is (F.linear re-lays out the weight on every call)
  fp32-packed  the weight prepacked once for oneDNN (the same maths; logits within ~1e-6)
  bf16-plain   the layer's input and weight in bf16, the output back in fp32
  bf16-packed  the same with the bf16 weight prepacked once (the same numbers as bf16-plain)

bf16 only where the CPU computes it in hardware (AVX512-BF16 or AMX-BF16); elsewhere oneDNN
emulates it, slower than fp32. The vocabulary head keeps fp32 in every kernel (logits and
sampling stay fp32), and so do norms, attention and RoPE: only the other linear layers change.

Which kernel is fastest depends on the CPU and on the row counts a decoder runs (measured on an
Intel Xeon with AMX, 2 threads, one 1024 -> 2816 -> 1024 FFN, ms per call: 2 rows fp32-plain
0.43, fp32-packed 0.49, bf16-packed 0.30; 26 rows 1.57, 1.06, 0.34), so `choose_kernel` times
each candidate on this machine at the decoder's own row counts (`row_plan`) and keeps the
fastest, cached per machine, model size and row plan. The quality stages (`arpg sample`,
`arpg gallery`) use the fixed `STUDY_KERNEL` of `sample.precision` instead: a result must not
depend on which kernel a timing happened to favour.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from arpg.errors import ArpgError
from arpg.machine import cpu_flags, cpu_name

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class LinearKernel:
    name: str
    precision: str  # fp32 | bf16: what the layers' matmuls compute in
    packed: bool    # weights prepacked once for oneDNN


KERNELS: dict[str, LinearKernel] = {k.name: k for k in (
    LinearKernel("fp32-plain", "fp32", False), LinearKernel("fp32-packed", "fp32", True),
    LinearKernel("bf16-plain", "bf16", False), LinearKernel("bf16-packed", "bf16", True),
)}
# The kernel of each sample.precision in the quality stages: fixed, so results never depend on a timing.
STUDY_KERNEL = {"fp32": "fp32-packed", "bf16": "bf16-packed"}


def bf16_hardware(flags: set[str] | None = None) -> str | None:
    """'AMX-BF16' or 'AVX512-BF16' where this CPU computes bf16 in hardware (and torch's oneDNN can
    use it), else None."""
    flags = cpu_flags() if flags is None else flags
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


@functools.cache
def packing_available(precision: str = "fp32") -> bool:
    """Whether oneDNN can prepack a `precision` weight here: the torch build has it, and for bf16 the
    CPU has the instructions oneDNN's reorder needs (AVX512BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only
    CPU has not). Asked of oneDNN itself with a tiny weight, not guessed from the CPU flags."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


def kernels_for(precision: str) -> list[str]:
    """The kernels this machine offers at `precision`; an ArpgError saying why where there are none."""
    if precision not in PRECISIONS:
        raise ArpgError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and bf16_hardware() is None:
        raise ArpgError("bf16 decoding on this CPU would be emulated (no AVX512-BF16 or AMX-BF16 in "
                        "/proc/cpuinfo, or no oneDNN bf16 in this torch build), slower than fp32; use "
                        "precision fp32 here (`arpg info` shows what the CPU has)")
    return [k.name for k in KERNELS.values() if k.precision == precision and (packing_available(precision) or not k.packed)]


def head_of(model: nn.Module) -> nn.Linear:
    """The vocabulary head (layers.add_output_head records its name)."""
    return getattr(model, model.output_head_name)


def use_kernel(model: nn.Module, kernel: str) -> int:
    """Run the model's linear layers with `kernel` from now on (CPU inference only: the packed and
    bf16 paths have no backward); the head stays fp32. Returns how many layers changed (0 for
    fp32-plain). The original fp32 weights stay, so state dicts and dtype queries work as before;
    packed and bf16 copies add their size in memory."""
    if kernel not in KERNELS:
        raise ArpgError(f"unknown linear kernel {kernel!r}; use one of {', '.join(KERNELS)}")
    spec = KERNELS[kernel]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if any(m.weight.device.type != "cpu" or m.weight.dtype != torch.float32 for m in linears):
        raise ArpgError(f"linear kernel {kernel} runs an fp32 model on the CPU; this one is "
                        f"{linears[0].weight.dtype} on {linears[0].weight.device}")
    if spec.packed and not packing_available(spec.precision):
        raise ArpgError(f"linear kernel {kernel} needs oneDNN prepacking of {spec.precision} weights, which this "
                        f"torch build or CPU lacks (bf16 needs AVX512BW/VL/DQ or AVX-NE-CONVERT); use "
                        f"{spec.precision}-plain")
    head = head_of(model)
    changed = 0
    with torch.no_grad():
        for linear in linears:
            linear.__dict__.pop("forward", None)  # back to nn.Linear.forward
            precision = "fp32" if linear is head else spec.precision
            if precision == "fp32" and not spec.packed:
                continue
            linear.forward = _forward(linear.weight.detach(), linear.bias, precision, spec.packed)
            changed += 1
    return changed


def _forward(weight: torch.Tensor, bias: torch.Tensor | None, precision: str, packed: bool) -> Callable:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    w = weight.to(dtype).contiguous()
    b = None if bias is None else bias.detach().to(dtype)
    if packed:
        w = torch.ops.mkldnn._reorder_linear_weight(w)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, b, "none", [], "").to(x.dtype)
    else:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x.to(dtype), w, b).to(x.dtype)
    return forward


# ---- choosing by measurement ------------------------------------------------------------------

def row_plan(model: nn.Module, counts: list[int], rows_per_token: int) -> Counter:
    """How often each (linear group, rows) call happens in one decoding call that decodes counts[s]
    tokens at step s: the model's `linear_groups` at its `step_tokens` (rows_per_token: the batch,
    doubled by CFG)."""
    plan: Counter = Counter()
    for step in model.step_tokens(counts):  # [{group: tokens}]
        for group, tokens in step.items():
            plan[group, tokens * rows_per_token] += 1
    return plan


def time_kernel(model: nn.Module, kernel: str, plan: Counter, repeats: int = 3,
                seed: int = 0) -> float:
    """Seconds the linear layers of one decoding call take with `kernel`: per (group, rows) the fastest
    of `repeats` timed passes after one untimed (first calls of a shape build oneDNN / MKL kernels;
    other processes only add time, so the minimum is the kernel's own cost), times how often the
    plan runs it, summed."""
    use_kernel(model, kernel)
    groups = model.linear_groups()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.inference_mode():
        for (group, rows), count in sorted(plan.items()):
            layers = groups[group]
            inputs = {m.in_features: torch.randn(rows, m.in_features, generator=gen) for m in layers}  # [rows, K]
            times = []
            for r in range(repeats + 1):
                begin = time.perf_counter()
                for m in layers:
                    m(inputs[m.in_features])
                times.append(time.perf_counter() - begin)
            total += count * min(times[1:])
    return total


def _cache_key(model: nn.Module, plan: Counter, candidates: list[str]) -> str:
    """Machine (CPU model and flags, torch, threads), model size (its linear shapes) and row plan."""
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    machine = [cpu_name(), sorted(cpu_flags() & {"amx_bf16", "avx512_bf16", "avx512f", "avx2"}),
               torch.__version__, torch.get_num_threads()]
    blob = json.dumps([machine, type(model).__name__, shapes, sorted(map(list, plan.items())), candidates])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def choose_kernel(model: nn.Module, plan: Counter, candidates: list[str], cache_path: Path | None = None) -> dict:
    """Time each candidate at `plan` (or read the cached choice for this machine, model size and
    plan), switch the model to the fastest and return {"kernel", "seconds": {kernel: s}, "cached"}."""
    key = _cache_key(model, plan, candidates)
    cache = _read_cache(cache_path)
    if key in cache and cache[key]["kernel"] in candidates:
        choice = dict(cache[key], cached=True)
    else:
        seconds = {k: time_kernel(model, k, plan) for k in candidates}
        choice = {"kernel": min(seconds, key=seconds.get), "seconds": seconds, "cached": False}
        if cache_path is not None:
            from arpg.utils import atomic_write_text

            cache[key] = {"kernel": choice["kernel"], "seconds": seconds}
            Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    use_kernel(model, choice["kernel"])
    return choice


def _read_cache(path: Path | None) -> dict:
    if path is None or not Path(path).is_file():
        return {}
    try:
        cache = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache only costs a new measurement
    return cache if isinstance(cache, dict) else {}


def prepare_for_decoding(model: nn.Module, precision: str, key: str) -> str:
    """Set an eval-mode generator up to decode at `precision` (the params key `key` asked for it)
    with the fixed kernel of the quality stages; returns what it runs. On a CPU: STUDY_KERNEL (or
    fp32-plain without oneDNN); on CUDA: the model in bf16 (its logits are cast to fp32 before
    sampling) or as it is."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        if precision == "bf16":
            model.to(torch.bfloat16)
        return f"{precision} ({device.type})"
    try:
        kernels = kernels_for(precision)
    except ArpgError as exc:
        raise ArpgError(f"{key}: {exc}") from None
    kernel = STUDY_KERNEL[precision] if STUDY_KERNEL[precision] in kernels else kernels[0]
    use_kernel(model, kernel)
    return kernel
