"""The benchmark's output: text tables printed as sections complete, the same tables in Markdown, targets."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["Report", "target"]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """Collects sections: printed as text tables as they complete, and rendered to Markdown at the end."""

    def __init__(self) -> None:
        self.md: list[str] = []

    def section(self, title: str, rows: list[dict[str, Any]], cols: list[str], notes: Sequence[str] = ()) -> None:
        print(f"\n## {title}\n")
        print(_table(rows, cols))
        for n in notes:
            print(n)
        sys.stdout.flush()
        self.md += [f"## {title}", "", _md_table(rows, cols), ""]
        self.md += [f"{n}  " for n in notes] + ([""] if notes else [])


def target(name: str, value: float, goal: float, higher_is_better: bool) -> dict[str, Any]:
    """A target row: ``value`` against ``goal`` (">= goal" or "<= goal"), status "met" or "MISSED"."""
    ok = value >= goal if higher_is_better else value <= goal
    return {
        "target": name,
        "value": value,
        "goal": f"{'>=' if higher_is_better else '<='} {goal:g}",
        "status": "met" if ok else "MISSED",
    }
