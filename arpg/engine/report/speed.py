"""The report's speed figures from profile.json: speed rows, the hardware line, FID-vs-speed pairs."""

from __future__ import annotations

import math
from typing import Any, Mapping

from arpg.engine.profile.sweep import SPEEDUP_COLUMNS
from arpg.engine.report.points import Point
from arpg.errors import ArpgError
from arpg.paths import format_cfg

# speed.csv: one row per measured configuration (memory in MiB)
SPEED_COLUMNS = ["model", "kind", "net", "precision", "kernel", "steps", "order", "batch", "img_s", "img_s_e2e",
                 "peak_mem_mib", "gen_mem_mib", "kv_cache_mib", "mem_kind"]
# speedups.csv: profile.json's speed-ups without the goal column
GAIN_COLUMNS = [c for c in SPEEDUP_COLUMNS if c not in ("goal", "load_avg_1m_after")]


def speed_rows(profile_doc: Mapping) -> list[dict[str, Any]]:
    """The measured (status ok) rows of profile.json in SPEED_COLUMNS."""
    rows = []
    for r in profile_doc["rows"]:
        if r.get("status") != "ok":
            continue
        rows.append({"model": r["model"], "kind": r["kind"], "net": r.get("net"), "precision": r["precision"],
                     "kernel": r.get("kernel"), "steps": r["steps"],
                     "order": r["order"],
                     "batch": r["batch"], "img_s": r["gen_img_s_median"], "img_s_e2e": r.get("e2e_img_s_median"),
                     "peak_mem_mib": _mib(r.get("peak_mem_bytes")), "gen_mem_mib": _mib(r.get("gen_mem_bytes")),
                     "kv_cache_mib": _mib(r.get("kv_cache_bytes")), "mem_kind": r.get("mem_kind")})
    return rows


def _mib(value) -> float | None:
    return None if value in (None, "") else float(value) / 2**20


def hardware(profile_doc: Mapping) -> str:
    """Where the timings were taken: device, CPU (and its bf16 hardware), threads, cores, precisions,
    torch, load, time."""
    meta = profile_doc.get("meta", {})
    rows = [r for r in profile_doc["rows"] if r.get("status") == "ok"] or profile_doc["rows"]
    if not rows:
        raise ArpgError("profile.json has no rows; rerun `arpg profile`")
    r = rows[0]
    device = r.get("device_name") or r.get("device")
    parts = [f"device {device} ({r.get('device')})", f"CPU {meta.get('cpu') or r.get('cpu')}",
             f"{r.get('threads')} threads", f"{meta.get('cpu_count')} logical cores",
             "precisions " + ", ".join(dict.fromkeys(str(x.get("precision")) for x in rows)),
             f"torch {meta.get('torch') or r.get('torch')}"]
    if "bf16_hardware" in meta:
        parts.insert(2, f"bf16 hardware: {meta['bf16_hardware'] or 'none'}")
    if "load_avg_1m" in meta:
        parts.append(f"1-min load average {meta['load_avg_1m']:.2f} when profiling started")
    if meta.get("time"):
        parts.append(f"measured {meta['time']}")
    return ", ".join(str(p) for p in parts)


def measured_how(profile_doc: Mapping) -> str:
    """How the speed-ups were timed and what the measurements say about a busy machine."""
    limits = profile_doc.get("meta", {}).get("profile", {})
    gains = profile_doc.get("speedups", [])
    text = ("Each speed-up comes from one process timing both decoders interleaved, one call each per round "
            f"({', '.join(sorted({str(g['speedup_rounds']) for g in gains})) or '-'} rounds): the median of "
            "the per-round ratios, and its distribution-free interval from order statistics (`speedup_gen_low` / "
            "`_high`, coverage `speedup_level`; 6 rounds: [min, max], 96.9%). Every row records the 1-minute load "
            "average, the measuring process's CPU share of the window over its threads (`cpu_share`) and the "
            "share of its ready time it waited for a CPU (`wait_share`: other processes on its cores).")
    waits = [x["wait_share"] for x in [*profile_doc["rows"], *gains] if x.get("wait_share") is not None]
    peak = f"{max(waits):.1%}" if waits else "unknown"
    if limits.get("max_wait_share") is None and limits.get("max_ratio_spread") is None:
        return text + (f" **Contention was not checked** (`profile.max_wait_share` and `max_ratio_spread` null; "
                       f"the largest wait share was {peak}): these timings are not results.")
    return text + (f" Checked: the profile stops when a wait share exceeds {_limit(limits.get('max_wait_share'), '.0%')} "
                   f"or a speed-up's rounds range over more than a factor "
                   f"{_limit(limits.get('max_ratio_spread'), 'g')}; the largest wait share here was {peak}.")


def _limit(value, spec: str) -> str:
    return "(unchecked)" if value is None else format(value, spec)


def pareto_pairs(points: list[Point], speed: list[dict], fid_col: str, precision: str) -> list[dict[str, Any]]:
    """Study points joined with the throughput of the study's own models at the same step count and
    order, timed at the precision the points were sampled at (with the FID's interval, `<fid>_lo` /
    `_hi`, None where the point has none)."""
    study = [r for r in speed if r["model"] == "default" and r["precision"] == precision]
    if not study:
        return []
    batch = max(r["batch"] for r in study)
    timing = {(r["kind"], r["steps"], r["order"]): r for r in study if r["batch"] == batch}
    out = []
    for p in points:
        t = timing.get((p.point.model, p.point.steps, p.point.order))
        if t is not None and p.metrics.get(fid_col) is not None:
            band = p.band(fid_col)
            out.append({"model": p.point.model, "steps": p.point.steps, "cfg": format_cfg(p.point.cfg),
                        "order": p.point.order, "img_s": t["img_s"], "batch": batch, fid_col: p.metrics[fid_col],
                        f"{fid_col}_lo": None if band is None else band[1],
                        f"{fid_col}_hi": None if band is None else band[2]})
    return out


def pareto_front(pairs: list[dict], fid_col: str) -> list[dict]:
    """Points no other point beats on both speed (higher img_s) and quality (lower FID), fastest first."""
    front, best = [], math.inf
    for p in sorted(pairs, key=lambda p: (-p["img_s"], p[fid_col])):  # fastest first: keep what lowers FID
        if p[fid_col] < best:
            front.append(p)
            best = p[fid_col]
    return front
