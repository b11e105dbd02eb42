"""PNG plots of results tables: accuracy vs eps, and the transfer matrix as a heatmap.

matplotlib is imported inside each function and used through its object API (an Agg canvas, no
pyplot state), so importing :mod:`rarn.robust.evaluation` does not load it, and plotting from a
worker thread is safe. Files are written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from rarn.checkpoint import atomic_path
from rarn.robust.evaluation.results import _checked

__all__ = ["plot_accuracy_vs_eps", "plot_transfer_heatmap", "save_figure"]


def save_figure(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path


def plot_accuracy_vs_eps(
    table: pa.Table, path: str | os.PathLike[str], *, attack: str | None = None
) -> Path:
    """PNG of accuracy vs eps: one line per model x attack with at least two radii.

    Each line starts at eps = 0 with the model's clean accuracy. Uses matplotlib's object API
    (Agg canvas, no pyplot state), imported here.

    Args:
        table: a :data:`RESULTS_SCHEMA` table.
        path: destination ``.png``.
        attack: plot only this attack (default: every attack with a curve).

    Returns:
        The written path.

    Raises:
        ValueError: wrong schema or nothing to plot; nothing is written.
    """
    from matplotlib.figure import Figure

    rows = _checked(table).to_pylist()
    if "source" in rows[0]:
        raise ValueError("plot_accuracy_vs_eps needs a RESULTS_SCHEMA table")
    clean = {r["model"]: r["accuracy"] for r in rows if r["attack"] == "clean"}
    lines: dict[tuple[str, str], dict[float, float]] = {}
    for r in rows:
        if r["attack"] in ("clean", "worst_case") or attack not in (None, r["attack"]):
            continue
        lines.setdefault((r["model"], r["attack"]), {})[r["eps"]] = r["accuracy"]
    lines = {k: v for k, v in lines.items() if len(v) >= 2}
    if not lines:
        raise ValueError("no model x attack has accuracies at two or more radii")
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for (model, name), pts in sorted(lines.items()):
        if model in clean:
            pts = {0.0: clean[model], **pts}
        eps_sorted = sorted(pts)
        ax.plot(eps_sorted, [pts[e] for e in eps_sorted], marker="o", label=f"{model} / {name}")
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, Path(path))


def plot_transfer_heatmap(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """PNG heatmap of a transfer matrix (rows: source, columns: target, cells: accuracy).

    Args:
        table: a :data:`TRANSFER_SCHEMA` table.
        path: destination ``.png``.

    Returns:
        The written path.

    Raises:
        ValueError: wrong schema; nothing is written.
    """
    from matplotlib.figure import Figure

    rows = _checked(table).to_pylist()
    if "source" not in rows[0]:
        raise ValueError("plot_transfer_heatmap needs a TRANSFER_SCHEMA table")
    sources = sorted({r["source"] for r in rows})
    targets = sorted({r["target"] for r in rows})
    acc = {(r["source"], r["target"]): r["accuracy"] for r in rows}
    grid = [[acc.get((s, t), math.nan) for t in targets] for s in sources]
    fig = Figure(figsize=(1.2 * len(targets) + 2.5, 1.0 * len(sources) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k")
    fig.colorbar(im, ax=ax, label="accuracy")
    return save_figure(fig, Path(path))
