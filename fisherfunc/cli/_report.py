"""What the command prints and writes about attention heads: a ranked table and a CSV of the matrix.

For a model whose attention parameters are grouped by heads, the rows are attention heads — one
per (layer, head), with the parts that make up its Fisher (:func:`fisherfunc.head_importance`:
Q rows, K and V rows shared by the query heads of a key-value group, O columns) — instead of
(parameter, head) pairs. ``heads.csv`` holds every entry of the matrix, one row per head.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..heads import HeadImportance

__all__ = ["head_rows", "heads_table", "write_heads_csv"]

_PARTS = ("q", "k", "v", "o")


def head_rows(imp: HeadImportance) -> list[tuple[int, int, float, tuple[float, ...]]]:
    """``(layer, head, Fisher, (Q, K, V, O))`` for every head, most important first."""
    rows = []
    for layer in range(imp.matrix.shape[0]):
        for head in range(imp.heads):
            parts = tuple(float(imp.parts[p][layer, head]) for p in _PARTS)
            rows.append((layer, head, float(imp.matrix[layer, head]), parts))
    return sorted(rows, key=lambda row: -row[2])


def heads_table(imp: HeadImportance, top: int) -> str:
    """The ranked table of attention heads (the ``top`` first and last rows)."""
    rows = head_rows(imp)
    lines = [f"  {'rank':>4}  {'layer':>5}  {'head':>4}  {'Fisher':>11}  {'Q':>10}  {'K':>10}  {'V':>10}  {'O':>10}"]
    for rank, (layer, head, value, parts) in enumerate(rows, 1):
        if rank <= top or rank > len(rows) - top:
            cells = "  ".join(f"{p:10.3e}" for p in parts)
            lines.append(f"  {rank:4d}  {layer:5d}  {head:4d}  {value:11.4e}  {cells}")
        elif rank == top + 1:
            lines.append(f"  {'...':>4}")
    return "\n".join(lines)


def write_heads_csv(imp: HeadImportance, path: Path) -> Path:
    """One row per (layer, head): the layer's module, the key-value head it reads, its Fisher and parts."""
    r = imp.heads // imp.kv_heads
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["attention", "layer", "module", "head", "kv_head", "fisher", "q", "k", "v", "o"])
        for layer, module in enumerate(imp.layers):
            for head in range(imp.heads):
                parts = [f"{float(imp.parts[p][layer, head]):.9e}" for p in _PARTS]
                value = f"{float(imp.matrix[layer, head]):.9e}"
                out.writerow([imp.attention, layer, module, head, head // r, value, *parts])
    return path
