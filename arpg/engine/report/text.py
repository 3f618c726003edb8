"""Markdown of the report: numbers as text, tables, one-record tables."""

from __future__ import annotations

from typing import Any, Mapping


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits (scientific when tiny or huge), None as '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def signed(value: float) -> str:
    return ("+" if value > 0 else "") + fmt(value)


def markdown_table(rows: list[Mapping[str, Any]], cols: list[str] | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    cols = cols or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_kv(values: Mapping[str, Any]) -> str:
    """One record as a two-column table (wide single rows read badly)."""
    return markdown_table([{"metric": k, "value": v} for k, v in values.items()], ["metric", "value"])
