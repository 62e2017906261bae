"""Pictures: word-to-region heatmaps over radiographs, and training curves.

    fig = heatmap_overlay(image, sim_map, box=(0.2, 0.1, 0.5, 0.4), title="left pleural effusion")
    fig = plot_training_curves("runs/x")                             # from <workdir>/metrics.jsonl

Drawing only: nothing here knows a model or an evaluator. The heatmaps of a trained run (maps computed as
the grounding evaluator does) are ``evaluators.grounding.save_heatmaps(run, "test", n=8)``.

Figures are ``matplotlib.figure.Figure`` objects built without pyplot (no GUI backend, no global figure
state): ``fig.savefig(path)`` writes them and Jupyter displays them. Boxes are (ymin, xmin, ymax, xmax)
fractions of the image, as in the data schema.
"""
from __future__ import annotations

import os
import re
import textwrap
from typing import Any, Optional, Sequence

import numpy as np

from medvlp_jax import logging_lib

BOX_COLOR = "#00ff66"


def cell_centres(n_cells: int, centres: Optional[tuple[float, float]] = None) -> np.ndarray:
    """[n_cells] centres of a grid axis's cells as fractions of the image side.

    Args:
        n_cells: cells along the axis.
        centres: (scale, offset), cell i centred at scale * i + offset (``types.GridCentres`` per axis); None:
            the half-pixel convention (i + 0.5) / n_cells.
    """
    scale, offset = (1.0 / n_cells, 0.5 / n_cells) if centres is None else centres
    return scale * np.arange(n_cells) + offset


def upsample_bilinear(grid_map: np.ndarray, size: tuple[int, int], centres=None) -> np.ndarray:
    """Bilinear resize with clamped edges; cells sit at their centres (default: half-pixel centres, as
    ``jax.image.resize`` 'bilinear' upsampling).

    Args:
        grid_map: [gh, gw].
        size: (h, w) of the output.
        centres: ``types.GridCentres`` ((scale_y, offset_y), (scale_x, offset_x)) of the grid's cells, e.g. a
            CNN's receptive-field centres; None: half-pixel centres.

    Returns:
        [h, w] float32.
    """
    m = np.asarray(grid_map, np.float32)
    if m.ndim != 2:
        raise ValueError(f"grid_map must be 2-D [gh, gw], got shape {m.shape}")

    def axis_weights(n_in: int, n_out: int, axis_centres):
        scale, offset = (1.0 / n_in, 0.5 / n_in) if axis_centres is None else axis_centres
        # Output pixel k (centre (k + 0.5) / n_out) in cell units: where it falls between cell centres.
        s = np.clip(((np.arange(n_out) + 0.5) / n_out - offset) / scale, 0, n_in - 1)
        i0 = np.floor(s).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (s - i0).astype(np.float32)

    cy, cx = (None, None) if centres is None else centres
    y0, y1, wy = axis_weights(m.shape[0], int(size[0]), cy)
    x0, x1, wx = axis_weights(m.shape[1], int(size[1]), cx)
    rows = m[y0] * (1 - wy)[:, None] + m[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]


def display_image(image: np.ndarray) -> np.ndarray:
    """[h, w] in [0, 1] for display from an evaluation image [h, w] / [h, w, c] in [-1, 1] (or [0, 1])."""
    a = np.asarray(image, np.float32)
    if a.ndim == 3:
        a = a[..., 0]
    if a.min() < 0:
        a = (a + 1.0) / 2.0
    return np.clip(a, 0.0, 1.0)


def safe_name(text: str, max_len: int = 60) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:max_len] or "x"


def wrap(text: str, width: int, max_lines: int) -> str:
    """``text`` wrapped to ``width`` characters, at most ``max_lines`` lines (the last ends with '...' if cut)."""
    lines = textwrap.wrap(" ".join(text.split()), width)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(0, width - 3)].rstrip() + "..."
    return "\n".join(lines)


def _boxes(box) -> np.ndarray:
    return np.zeros((0, 4)) if box is None else np.asarray(box, np.float64).reshape(-1, 4)


def heatmap_overlay(image: np.ndarray, sim_map: np.ndarray, box=None, *, title: Optional[str] = None, ax=None,
                    alpha: float = 0.45, cmap: str = "jet", mark_max: bool = True):
    """The radiograph in grey with the (min-max normalised) map over it and the box(es) drawn.

    Args:
        image: [h, w] or [h, w, c] (values in [-1, 1] or [0, 1]).
        sim_map: [gh, gw] (upsampled bilinearly) or [h, w].
        box: None, one (ymin, xmin, ymax, xmax) box or [k, 4], fractions of the image.
        title: panel title (wrapped).
        ax: draw into this Axes; default a new one-panel Figure.
        alpha: opacity of the map.
        cmap: colour map of the map.
        mark_max: mark the map's maximum (the pointing-game point) with a cross.

    Returns:
        the Figure.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    img = display_image(image)
    h, w = img.shape
    m = np.asarray(sim_map, np.float32)
    if m.shape != (h, w):
        m = upsample_bilinear(m, (h, w))
    lo, hi = float(m.min()), float(m.max())
    norm = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    if ax is None:
        fig = Figure(figsize=(4, 4.4))
        ax = fig.add_subplot(1, 1, 1)
    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.imshow(norm, cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="nearest")
    for ymin, xmin, ymax, xmax in _boxes(box):
        ax.add_patch(Rectangle((xmin * w - 0.5, ymin * h - 0.5), (xmax - xmin) * w, (ymax - ymin) * h,
                               fill=False, edgecolor=BOX_COLOR, linewidth=2))
    if mark_max and hi > lo:
        yi, xi = np.unravel_index(int(np.argmax(m)), m.shape)
        ax.plot([xi], [yi], marker="x", color="white", markersize=9, markeredgewidth=2.5)
    if title:
        ax.set_title(wrap(title, 38, 2), fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.figure


def phrase_figure(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray, Any]], *, title: Optional[str] = None):
    """One row: the image alone, then one heatmap panel per (phrase, map, boxes).

    Args:
        image: [h, w] or [h, w, c].
        panels: (phrase, map [gh, gw] or [h, w], boxes [k, 4] fractions or None) per phrase.
        title: figure title (e.g. the report; wrapped, at most 3 lines).

    Returns:
        the Figure.
    """
    from matplotlib.figure import Figure
    n = len(panels) + 1
    fig = Figure(figsize=(3.2 * n, 4.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(display_image(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    for ax, (phrase, sim_map, boxes) in zip(axes[1:], panels):
        heatmap_overlay(image, sim_map, boxes, title=phrase, ax=ax)
    if title:
        fig.suptitle(wrap(title, 42 * n, 3), fontsize=9)
    return fig


_DEFAULT_PANELS = (
    ("loss", lambda k: k == "train/loss" or k.startswith("loss/")),
    ("accuracy (in-batch)", lambda k: k.startswith("acc/")),
    ("learning rate", lambda k: k == "train/lr"),
    ("gradient norm", lambda k: k == "train/grad_norm"),
)


def plot_training_curves(workdir: str, keys: Optional[Sequence[str]] = None):
    """Training curves from ``metrics.jsonl``.

    Args:
        workdir: pretraining workdir.
        keys: metrics to plot, one panel each; default panels: loss terms, in-batch accuracies, learning
            rate, gradient norm (those present).

    Returns:
        the Figure.
    """
    from matplotlib.figure import Figure
    rows = logging_lib.read_metrics(workdir)
    names = sorted({k for r in rows for k in r if k not in ("step", "time")})
    if keys is not None:
        missing = [k for k in keys if k not in names]
        if missing:
            raise KeyError(f"metrics {missing} are not in {workdir}/metrics.jsonl; it has {names}")
        panels = [(k, [k]) for k in keys]
    else:
        panels = [(title, [k for k in names if pick(k)]) for title, pick in _DEFAULT_PANELS]
        panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        raise ValueError(f"nothing to plot in {workdir}/metrics.jsonl")
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ks) in zip(axes, panels):
        for k in ks:
            pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None and np.isfinite(r[k])]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, marker="." if len(pts) < 30 else None, label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(ks) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(os.path.basename(os.path.normpath(workdir)), fontsize=10)
    return fig
