"""Tables of results: per-state top-1 per method, mean incremental accuracies, old/new."""

from __future__ import annotations

from typing import Any


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def state_table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per method, top-1 after each state, then the summaries."""
    if not results:
        return ""
    n = max(len(r["states"]) for r in results.values())
    seen = next(iter(results.values()))["state_ends"][:n]
    head = ["method", *[f"{c} cl." for c in seen], "mean inc.", "mean inc. (excl. 1st)",
            "last old", "last new", "forgetting", "time (s)"]
    rows = []
    for name, r in results.items():
        tops = [s["top1"] for s in r["states"]] + [None] * (n - len(r["states"]))
        last = r["states"][-1] if r["states"] else {}
        rows.append([
            name, *[_fmt(t) for t in tops],
            _fmt(r.get("mean_incremental_top1"), 2), _fmt(r.get("mean_incremental_top1_excl_first"), 2),
            _fmt(last.get("top1_old")), _fmt(last.get("top1_new")),
            _fmt(r.get("average_forgetting")), _fmt(r.get("wall_time_s")),
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
