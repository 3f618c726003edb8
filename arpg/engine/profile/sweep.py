"""The parent of `arpg profile`: each configuration in its own child process, skips, the sweep; then
what it writes: each parallel decoder's speed-up over each sequential one, profile.csv /
profile.json, the text summary and the flat MLflow metrics (its figures:
`arpg.figures.profile_figures`).

A configuration is skipped when it cannot finish within `profile.max_seconds`: a cheaper one
already did not, or its first call ran over and was stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from arpg.commands.profile import RunSpec, dominated_by, reference_record
from arpg.decoders import DECODERS, in_native_order, labels
from arpg.engine.profile.child import base_row, measure, measure_rounds, spread
from arpg.engine.profile.quiet import Quiet, check_quiet, check_spread, median_interval, share_text  # noqa: F401
from arpg.errors import ArpgError
from arpg.machine import cpu_name
from arpg.paths import REPO_ROOT
from arpg.utils import write_csv, write_json

CHILD_ENTRY = "arpg.engine.profile.child:main"
# What the configurations' warm server imports: torch and every arpg module (the models, the sampler).
CHILD_PRELOAD = ("torch", "arpg")
# Time allowed for a child to import torch and build its model before its first call.
LOAD_TIMEOUT_S = 900.0


def child_env(spec: RunSpec) -> dict:
    """The environment of a configuration's process."""
    from arpg.pipeline import python_path_with

    # Spinning OpenMP workers stall whenever another process holds a core (40x slower small matmuls
    # measured on a busy 2-core machine); passive waiting keeps shared-machine timings meaningful.
    # The child runs in this working directory (relative checkpoint paths) with this arpg package.
    from arpg import warm

    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
               OMP_WAIT_POLICY=spec.omp_wait_policy.upper(), PYTHONPATH=python_path_with(str(REPO_ROOT)))
    for var in (warm.USAGE_ENV, warm.SOCKET_ENV):  # the stage's own: Snakemake's benchmark measures these
        env.pop(var, None)                         # processes as part of the profile job
    return env


def run_isolated(spec: RunSpec, poll_s: float = 0.05, server: str | None = None,
                 group: list[RunSpec] | None = None, rounds: int = 0) -> dict:
    """Measure `spec` in a process of its own (a fork of the warm `server` when given, which has
    imported torch and arpg already); stop it if its first call runs past max_seconds. With `group`
    (spec's model, batch and precision: each decoder's configurations), time those interleaved for
    `rounds` rounds instead (child.measure_rounds)."""
    with tempfile.TemporaryDirectory(prefix="arpg-profile-") as tmp:
        tmp = Path(tmp)
        payload = [dataclasses.asdict(s) for s in group] if group else dataclasses.asdict(spec)
        (tmp / "spec.json").write_text(json.dumps(payload))
        env = child_env(spec)
        args = ["--one", str(tmp / "spec.json"), "--out", str(tmp / "row.json"), "--markers", str(tmp)]
        if group:
            args += ["--rounds", str(rounds)]
        cmd = ([sys.executable, "-m", "arpg.warm", "run", server, CHILD_ENTRY, *args] if server
               else [sys.executable, "-m", "arpg.engine.profile", *args])
        with open(tmp / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            started = time.monotonic()
            reason = None
            try:
                while proc.poll() is None and reason is None:
                    time.sleep(poll_s)
                    loaded = tmp / "loaded"
                    if not loaded.exists():
                        if time.monotonic() - started > LOAD_TIMEOUT_S:
                            reason = f"model not built within {LOAD_TIMEOUT_S:g} s"
                    elif not (tmp / "first").exists() and time.time() - float(loaded.read_text()) > spec.max_seconds:
                        reason = (f"first call still running after profile.max_seconds {spec.max_seconds:g} s "
                                  "(stopped)")
            finally:  # also on Ctrl-C: never leave the child running
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if reason and group:
            raise ArpgError(f"timing {spec.model} batch {spec.batch} {spec.precision} interleaved: {reason}")
        if reason:
            row = base_row(spec)
            row.update(status="skipped", skip_reason=reason, device=spec.device)
            return row
        if proc.returncode != 0 or not (tmp / "row.json").exists():
            tail = (tmp / "stderr.txt").read_text()[-3000:]
            marker = "ArpgError:"
            message = tail.rsplit(marker, 1)[-1].strip() if marker in tail else tail
            raise ArpgError(f"profiling {spec.label()} failed in its child process "
                            f"(exit {proc.returncode}):\n{message}")
        return json.loads((tmp / "row.json").read_text())


def run_profile(specs: list[RunSpec], *, isolate: bool = True, log: Callable[[str], None] = print,
                rounds: int = 0, quiet: Quiet = Quiet(None, None)) -> list[dict]:
    """Measure every spec (skipping those a skipped cheaper one rules out); rows in spec order.
    VQ decoding is timed in the first measured configuration of each decode group and added to
    every row of the group (end to end). Isolated, each configuration runs in a fork of a warm
    server (one per child environment), so none pays for importing torch. Then, with `rounds`, each
    group of one model, batch and device is timed interleaved (`time_rounds`): the speed-ups' source.
    A measurement showing contention (`quiet`) stops the profile."""
    from arpg import warm

    rows: list[dict] = []
    skipped: list[RunSpec] = []
    servers: dict[tuple, str] = {}
    decoded: set[tuple] = set()  # decode groups whose VQ decoding is timed already
    with contextlib.ExitStack() as stack:
        for spec in specs:
            if spec.tokenizer is not None and spec.decode_group() not in decoded:
                spec = dataclasses.replace(spec, time_decode=True)
            cheaper = dominated_by(spec, skipped)
            lacking = _precision_unavailable(spec)
            if lacking or cheaper is not None:
                row = base_row(spec)
                row.update(status="skipped", device=spec.device,
                           skip_reason=lacking or f"cheaper configuration ({cheaper.label()}) exceeded "
                                                  "profile.max_seconds")
            elif isolate:
                env = child_env(spec)
                key = tuple(sorted(warm.load_time_env(env).items()))
                if key not in servers:
                    servers[key] = stack.enter_context(warm.serving(env, CHILD_PRELOAD))
                row = run_isolated(spec, server=servers[key])
            else:
                row = measure(spec)
            check_quiet(row, quiet, spec.label())
            if row["status"] == "skipped":
                skipped.append(spec)
                log(f"  {spec.label()}: skipped ({row['skip_reason']})")
            else:
                log(f"  {spec.label()}: {row['gen_img_s_median']:.4g} img/s "
                    f"({row['gen_s_median']:.3g} s/call, min {row['gen_s_min']:.3g}, max {row['gen_s_max']:.3g}), "
                    f"gen mem {row['gen_mem_bytes'] / 2**20:.1f} MiB, kv {row['kv_cache_bytes'] / 2**20:.1f} MiB")
            rows.append(row)
            if "decode_s_median" in row:
                decoded.add(spec.decode_group())
        if rounds:
            for group in round_groups(specs, rows):
                first = specs[group[0]]
                what = f"{first.model} batch {first.batch} interleaved"
                if isolate:
                    key = tuple(sorted(warm.load_time_env(child_env(first)).items()))
                    result = run_isolated(first, server=servers.get(key), group=[specs[i] for i in group],
                                          rounds=rounds)
                else:
                    result = measure_rounds([specs[i] for i in group], rounds)
                check_quiet(result, quiet, what)
                for i, seconds in zip(group, result["seconds"]):
                    rows[i].update(round_s=seconds, round_group=group[0],
                                   **{f"round_{k}": result[k] for k in ROUND_RECORD})
                log(f"  {what}: {rounds} rounds of {len(group)} configurations, waited "
                    f"{share_text(result['wait_share'])} of the time ready to run, CPU share {share_text(result['cpu_share'])}")
    attach_end_to_end(rows, [s.decode_group() for s in specs])
    if rounds:
        check_spread(speedups(rows), quiet)
    return rows


ROUND_RECORD = ("wait_share", "cpu_share", "load_avg_1m", "load_avg_1m_after")  # rows' round_<key>


def round_groups(specs: list[RunSpec], rows: list[dict]) -> list[list[int]]:
    """Indices of the measured native-order configurations of each model, batch and device (every
    precision), where a parallel and a sequential decoder were both measured: what a speed-up pairs."""
    groups: dict[tuple, list[int]] = {}
    for i, (spec, row) in enumerate(zip(specs, rows)):
        if row["status"] == "ok" and in_native_order(row):
            groups.setdefault((spec.model, spec.batch, spec.device), []).append(i)
    return [g for g in groups.values() if len({DECODERS[specs[i].kind].parallel for i in g}) == 2]


def _precision_unavailable(spec: RunSpec) -> str:
    """Why spec.precision cannot be measured on this machine ('' if it can): bf16 on a CPU that
    would only emulate it."""
    from arpg.models.cpu_kernels import bf16_hardware
    from arpg.utils import resolve_device

    if spec.precision != "bf16" or resolve_device(spec.device).type != "cpu" or bf16_hardware():
        return ""
    return "bf16: this CPU has no AVX512-BF16 or AMX-BF16 (oneDNN would emulate it, slower than fp32)"


# --------------------------------------------------------------------------- what the profile writes

# Issue 7's goal: speed-up >= 7x at 32 and >= 3.5x at 64 of 256 tokens, i.e. 7/8 of the step ratio.
GOAL_FRACTION_OF_STEP_RATIO = 0.875

CSV_COLUMNS = [
    "model", "net", "kind", "backbone", "params", "grid", "tokens", "steps", "order", "batch", "cfg", "status",
    "skip_reason",
    "gen_s_median", "gen_s_min", "gen_s_max", "gen_img_s_median", "gen_img_s_min", "gen_img_s_max",
    "e2e_s_median", "e2e_s_min", "e2e_s_max", "e2e_img_s_median", "e2e_img_s_min", "e2e_img_s_max",
    "decode_s_median", "decode_s_min", "decode_s_max", "decode_timed_in",
    "first_call_s", "peak_mem_bytes", "loaded_mem_bytes", "gen_mem_bytes", "mem_kind", "kv_cache_bytes",
    "repeats", "warmup", "device", "device_name", "threads", "precision", "kernel", "kernel_cached", "kernel_seconds",
    "compile", "torch", "cpu",
    "load_avg_1m", "load_avg_1m_after", "wait_share", "cpu_share", "omp_wait_policy", "round_group",
    "round_wait_share", "round_cpu_share", "round_load_avg_1m", "round_load_avg_1m_after",
]
SPEEDUP_COLUMNS = [
    "decoder", "baseline", "model", "precision", "decoder_kernel", "baseline_kernel", "batch", "steps", "tokens",
    "step_ratio", "goal", "speedup_gen", "speedup_gen_low", "speedup_gen_high", "speedup_level", "speedup_rounds",
    "speedup_spread", "speedup_e2e", "kv_ratio", "gen_mem_ratio", "wait_share", "cpu_share", "load_avg_1m",
    "load_avg_1m_after",
]
PRECISION_SPEEDUP_COLUMNS = ["model", "kind", "net", "steps", "order", "batch", "fp32_kernel", "bf16_kernel",
                             "fp32_img_s", "bf16_img_s", "speedup"]
BEST = "best"  # the speed-ups' precision label for each decoder at its fastest precision and kernel


def attach_end_to_end(rows: list[dict], groups: list[tuple]) -> None:
    """End to end = each timed generation call + the median VQ decoding time of its decode group
    (groups[i]: rows[i]'s RunSpec.decode_group(); the one row of a group that timed decoding carries
    decode_s_*). Rows of a group without a timed decoding (no tokenizer) get no end-to-end figures."""
    timed = {}
    for row, group in zip(rows, groups):
        if row["status"] == "ok" and "decode_s_median" in row:
            timed[group] = row
    for row, group in zip(rows, groups):
        source = timed.get(group)
        if row["status"] != "ok" or source is None:
            continue
        decode_s = source["decode_s_median"]
        row.update({k: source[k] for k in ("decode_s_median", "decode_s_min", "decode_s_max")})
        row["decode_timed_in"] = f"{source['kind']} steps={source['steps']} order={source['order']}"
        e2e_s = [g + decode_s for g in row["gen_s_all"]]
        row["e2e_s_median"], row["e2e_s_min"], row["e2e_s_max"] = spread(e2e_s)
        row["e2e_img_s_median"], row["e2e_img_s_min"], row["e2e_img_s_max"] = spread([row["batch"] / s for s in e2e_s])


def speedups(rows: list[dict]) -> list[dict]:
    """Each parallel decoder at S steps over each sequential one at the same model, batch and precision
    (each at the kernel measured fastest for it), with the step ratio n/S beside it; where several
    precisions were measured, also each decoder at its own fastest precision (precision "best").
    A speed-up is the median of the per-round ratios of the two timed interleaved (rows' `round_s`),
    with the order-statistic interval of that median; rows not timed in rounds give none."""
    ok = [r for r in rows if r["status"] == "ok" and in_native_order(r)]  # strategies: in the rows, not the speed-ups
    if len({r["precision"] for r in ok}) > 1:
        fastest: dict[tuple, dict] = {}
        for r in ok:
            key = _config(r)
            if key not in fastest or r["gen_img_s_median"] > fastest[key]["gen_img_s_median"]:
                fastest[key] = r
        ok = ok + [dict(r, precision=BEST) for r in fastest.values()]
    parallel = {d.name for d in DECODERS.values() if d.parallel}
    sequential = [{(r["model"], r["batch"], r["precision"]): r for r in ok if r["kind"] == d.name}
                  for d in DECODERS.values() if not d.parallel]
    out = []
    for r, base in ((r, by_size.get((r["model"], r["batch"], r["precision"]))) for by_size in sequential
                    for r in ok):
        if r["kind"] not in parallel or base is None:
            continue
        if r["backbone"] != base["backbone"]:
            raise ArpgError(f"{r['model']}: {r['kind']} backbone {r['backbone']} differs from its "
                            f"{base['kind']} twin's "
                            f"{base['backbone']} ({base['net']}); fix RASTER_TWIN in "
                            "arpg/sizes.py")
        if r.get("round_group") is None or r.get("round_group") != base.get("round_group"):
            continue  # not timed interleaved with its twin: no speed-up
        ratio = r["tokens"] / r["steps"]
        # one ratio per round: both timed within a few seconds of each other, in one process
        ratios = [b / a for a, b in zip(r["round_s"], base["round_s"])]
        lo, hi, level = median_interval(ratios)
        e2e = None
        if r.get("decode_s_median") is not None and base.get("decode_s_median") is not None:
            e2e = statistics.median((b + base["decode_s_median"]) / (a + r["decode_s_median"])
                                    for a, b in zip(r["round_s"], base["round_s"]))
        item = {
            "decoder": r["kind"], "baseline": base["kind"], "model": r["model"], "precision": r["precision"],
            "decoder_kernel": r.get("kernel"), "baseline_kernel": base.get("kernel"), "batch": r["batch"],
            "steps": r["steps"], "tokens": r["tokens"],
            "step_ratio": ratio, "goal": GOAL_FRACTION_OF_STEP_RATIO * ratio,
            "speedup_gen": statistics.median(ratios), "speedup_gen_low": lo, "speedup_gen_high": hi,
            "speedup_level": level, "speedup_rounds": len(ratios), "speedup_spread": max(ratios) / min(ratios),
            "speedup_e2e": e2e,
            **{k: r[f"round_{k}"] for k in ROUND_RECORD},
            "kv_ratio": r["kv_cache_bytes"] / base["kv_cache_bytes"],
            "gen_mem_ratio": (r["gen_mem_bytes"] / base["gen_mem_bytes"] if base["gen_mem_bytes"] > 0 else None),
        }
        out.append(item)
    return out


def precision_speedups(rows: list[dict]) -> list[dict]:
    """bf16 over fp32 for every configuration measured at both (each at its fastest kernel)."""
    ok = [r for r in rows if r["status"] == "ok"]
    fp32 = {_config(r): r for r in ok if r["precision"] == "fp32"}
    out = []
    for r in ok:
        base = fp32.get(_config(r))
        if r["precision"] != "bf16" or base is None:
            continue
        out.append({"model": r["model"], "kind": r["kind"], "net": r["net"], "steps": r["steps"],
                    "order": r["order"], "batch": r["batch"],
                    "fp32_kernel": base.get("kernel"), "bf16_kernel": r.get("kernel"),
                    "fp32_img_s": base["gen_img_s_median"], "bf16_img_s": r["gen_img_s_median"],
                    "speedup": r["gen_img_s_median"] / base["gen_img_s_median"]})
    return out


def _config(r: dict) -> tuple:
    return r["model"], r["kind"], r["steps"], r["order"], r["batch"], r["device"]


def precision_suffix(precision: str) -> str:
    """What a metric name gains for a precision other than fp32 (fp32 names stay as they were)."""
    return "" if precision == "fp32" else f".{precision}"


def environment() -> dict:
    import torch

    from arpg.models.cpu_kernels import bf16_hardware

    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "bf16_hardware": bf16_hardware(),
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_outputs(rows: list[dict], csv_path: Path, json_path: Path, meta: dict) -> dict:
    """profile.csv (one row per configuration) and profile.json (rows, speed-ups, anchors); the document."""
    write_csv(csv_path, rows, CSV_COLUMNS)
    doc = {"meta": meta, "rows": rows, "speedups": speedups(rows), "precision_speedups": precision_speedups(rows),
           "reference": reference_record(rows)}
    write_json(json_path, doc)
    return doc


def summary(doc: dict) -> str:
    """The speed-up table (issue 7's 'done when' figures) and the reference comparison as text."""
    par, seq = labels(parallel=True, short=True), labels(parallel=False, short=True)
    lines = [f"{par} speed-up over {seq} decoding (generation only, timed interleaved: median of the per-round "
             "ratios, [low, high] its order-statistic interval)",
             f"{'model':<10}{'prec':>5}{'batch':>6}{'steps':>7}{'speed-up':>10}{'[low, high]':>16}{'n/S':>7}"
             f"{'goal':>7}{'e2e':>8}{'kv':>7}{'mem':>7}"]
    several_pairs = len({(g["decoder"], g["baseline"]) for g in doc["speedups"]}) > 1
    for g in doc["speedups"]:
        e2e = f"{g['speedup_e2e']:.2f}x" if g["speedup_e2e"] else "-"
        mem = f"{g['gen_mem_ratio']:.2f}" if g["gen_mem_ratio"] else "-"
        pair = f"{g['decoder']} over {g['baseline']}: " if several_pairs else ""
        lines.append(f"{pair}{g['model']:<10}{g['precision']:>5}{g['batch']:>6}{g['steps']:>7}{g['speedup_gen']:>9.2f}x"
                     f"{'[%.2f, %.2f]' % (g['speedup_gen_low'], g['speedup_gen_high']):>16}"
                     f"{g['step_ratio']:>6.0f}x{g['goal']:>6.1f}x{e2e:>8}{g['kv_ratio']:>7.2f}{mem:>7}")
    if doc["precision_speedups"]:
        lines.append("bf16 over fp32 (generation img/s, each at its fastest measured kernel)")
        for p in doc["precision_speedups"]:
            order = "" if in_native_order(p) else f" order={p['order']}"
            lines.append(f"  {p['model']}/{p['kind']} steps={p['steps']}{order} batch={p['batch']}: {p['fp32_img_s']:.4g} "
                         f"({p['fp32_kernel']}) -> {p['bf16_img_s']:.4g} ({p['bf16_kernel']}) = {p['speedup']:.2f}x")
    skipped = [r for r in doc["rows"] if r["status"] == "skipped"]
    for r in skipped:
        lines.append(f"skipped: {r['model']}/{r['kind']} steps={r['steps']} batch={r['batch']} {r['precision']}: "
                     f"{r['skip_reason']}")
    comparison = doc["reference"]["comparison"]
    if comparison:
        lines.append("vs the public releases (issue 7 anchors, same machine class; ours / theirs in img/s)")
        for c in comparison:
            lines.append(f"  {c['name']:<26} {c['kind']:<7} steps={c['steps']:<4} batch={c['batch']}: ours "
                         f"{c['ours_img_s']:.4g} vs {c['img_s']:.4g} = {c['ratio']:.2f}x "
                         f"(target >= {c['target_ratio']}x: {'met' if c['met'] else 'NOT met'})")
    lines.append(f"(kv: {par} / {seq} analytic KV-cache bytes; mem: {par} / {seq} measured generation memory)")
    waits = [x["wait_share"] for x in doc["rows"] + doc["speedups"] if x.get("wait_share") is not None]
    if waits:
        lines.append(f"contention: the measuring processes waited for a CPU at most {max(waits):.1%} of the time "
                     "they were ready to run")
    return "\n".join(lines)


def metrics(doc: dict) -> dict[str, float]:
    """Flat MLflow metrics: img/s and memory per configuration, speed-ups."""
    out: dict[str, float] = {}
    for r in doc["rows"]:
        if r["status"] != "ok":
            continue
        key = (f"{r['model']}.{r['kind']}.b{r['batch']}.s{r['steps']}"
               + ("" if in_native_order(r) else f".{r['order']}")
               + precision_suffix(r["precision"]))
        out[f"img_s.{key}"] = r["gen_img_s_median"]
        if r.get("e2e_img_s_median"):
            out[f"img_s_e2e.{key}"] = r["e2e_img_s_median"]
        out[f"gen_mem_mib.{key}"] = r["gen_mem_bytes"] / 2**20
        out[f"kv_mib.{key}"] = r["kv_cache_bytes"] / 2**20
    for g in doc["speedups"]:
        out[f"speedup.{g['model']}.b{g['batch']}.s{g['steps']}"
            + precision_suffix(g["precision"])] = g["speedup_gen"]
    return out
