"""Issue 7's reference anchors for `arpg profile` and our rows that match their conditions."""

from __future__ import annotations

# Issue 7's anchors: the public releases' own generate() on a 2-core CPU, fp32,
# CFG 4, 16x16 tokens, random weights, median of 3 after a warm-up. They are
# reference figures measured elsewhere, reported beside ours, never mixed in.
REFERENCE_ANCHORS: list[dict] = [
    {"name": "ARPG release generate()", "model": "ARPG-L", "kind": "arpg", "steps": 32, "batch": 1,
     "s_per_call": 8.35, "img_s": 1 / 8.35, "target_ratio": 1.2},
    {"name": "ARPG release generate()", "model": "ARPG-L", "kind": "arpg", "steps": 64, "batch": 1,
     "s_per_call": 13.3, "img_s": 1 / 13.3, "target_ratio": 1.2},
    {"name": "LlamaGen GPT-L generate()", "model": "ARPG-L", "kind": "raster", "steps": 256, "batch": 1,
     "s_per_call": 83.9, "img_s": 1 / 83.9, "target_ratio": 1.0},
    {"name": "ARPG release generate()", "model": "ARPG-L", "kind": "arpg", "steps": 32, "batch": 8,
     "s_per_call": 8 / 0.281, "img_s": 0.281, "target_ratio": 1.2},
    {"name": "LlamaGen GPT-L generate()", "model": "ARPG-L", "kind": "raster", "steps": 256, "batch": 8,
     "s_per_call": 8 / 0.0854, "img_s": 0.0854, "target_ratio": 1.0},
]
ANCHOR_CONDITIONS = {"device": "cpu", "threads": 2, "precision": "fp32", "cfg": 4.0, "grid": 16}
NOTE = "anchors: issue 7, public releases' own generate() measured on a 2-core CPU; not measured by this run"


def reference_comparison(rows: list[dict]) -> list[dict]:
    """Our rows next to issue 7's anchors, where the conditions match."""
    out = []
    for anchor in REFERENCE_ANCHORS:
        match = [r for r in rows if r["status"] == "ok" and r["model"] == anchor["model"]
                 and r["kind"] == anchor["kind"] and r["steps"] == anchor["steps"] and r["batch"] == anchor["batch"]
                 and r["device"] == ANCHOR_CONDITIONS["device"] and r["threads"] == ANCHOR_CONDITIONS["threads"]
                 and r["precision"] == ANCHOR_CONDITIONS["precision"] and r["cfg"] == ANCHOR_CONDITIONS["cfg"]
                 and r["grid"] == ANCHOR_CONDITIONS["grid"]]
        if not match:
            continue
        ours = match[0]["gen_img_s_median"]
        out.append({**anchor, "ours_img_s": ours, "ours_s_per_call": match[0]["gen_s_median"],
                    "ratio": ours / anchor["img_s"], "met": ours / anchor["img_s"] >= anchor["target_ratio"]})
    return out


def reference_record(rows: list[dict]) -> dict:
    """The anchors, their conditions and our matching rows: profile.json's "reference"."""
    return {"conditions": ANCHOR_CONDITIONS, "anchors": REFERENCE_ANCHORS,
            "comparison": reference_comparison(rows), "note": NOTE}
