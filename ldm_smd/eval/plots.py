"""Matplotlib (Agg) figures for the benchmarks: sample scatters, image grids, metric-against-steps
panels (one benchmark, or several side by side)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ldm_smd.data.mixtures import GaussianMixture  # noqa: E402

METRIC_LABELS = {
    "precision": "precision (98.9% radius)",
    "recall": "mode recall",
    "kl": "KL(sampled modes || weights)",
    "spread": "spread (1 = right)",
    "logp_mean": "mean log-density",
    "sw": "sliced Wasserstein (gray: a true sample's)",
    "logp_median": "median log-density",
    "sw_removed": "share of vanilla's excess SW removed",
    "nonfinite": "non-finite share",
    "fd": "Fréchet distance (classifier features)",
    "fd_removed": "share of vanilla's excess FD removed",
    "confident": "share labelled with confidence >= 0.9",
    "class_kl": "KL(sampled classes || train)",
    "nn_dist": "RMS distance to nearest train image",
}
#: rows that need no training (drawn dashed, hollow markers)
REFERENCE_ROWS = ("exact_posterior", "best_gaussian", "real_data")


def _projection(mixture: GaussianMixture) -> np.ndarray:
    """``(D, 2)``: identity on 2-D data, else the top two principal axes of the means."""
    means = mixture.means.numpy()
    if mixture.dim == 2:
        return np.eye(2)
    centred = means - means.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = vt[:2].T
    return proj if proj.shape[1] == 2 else np.eye(mixture.dim)[:, :2]


def _mosaic(x: np.ndarray, shape: Sequence[int], n: int = 16) -> np.ndarray:
    c, h, w = shape
    side = int(math.sqrt(n))
    imgs = np.clip((x[: side * side].reshape(-1, c, h, w) + 1) / 2, 0, 1)
    if imgs.shape[0] < side * side:
        imgs = np.concatenate([imgs, np.zeros((side * side - imgs.shape[0], c, h, w))])
    grid = imgs.reshape(side, side, c, h, w).transpose(0, 3, 1, 4, 2).reshape(side * h,
                                                                              side * w, c)
    return grid[..., 0] if c == 1 else grid


def sample_scatter(
    samples: Mapping[tuple[str, int], np.ndarray],
    mixture: GaussianMixture,
    methods: Sequence[str],
    T_list: Sequence[int],
    path: str | os.PathLike,
    *,
    max_points: int = 2000,
    transpose: bool = False,
    titles: Mapping[str, str] | None = None,
) -> str:
    """Grid of panels, rows = methods, columns = T (``transpose``: rows = T, columns = methods,
    so methods stand side by side): samples (first 2 coordinates, or the means' principal plane
    for D > 2, or a picture mosaic for image mixtures) over the true means. ``titles`` names a
    method's panels (default: the method's name)."""
    titles = dict(titles or {})
    rows, cols = len(methods), len(T_list)
    if transpose:
        rows, cols = cols, rows
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    proj = None if mixture.image_shape is not None else _projection(mixture)
    if proj is not None:
        means2 = mixture.means.numpy() @ proj
        spread = np.abs(means2).max() + 4 * float(mixture.stds.max())
    for i, method in enumerate(methods):
        for j, T in enumerate(T_list):
            ax = axes[j][i] if transpose else axes[i][j]
            x = samples.get((method, T))
            if x is not None:
                x = np.asarray(x, dtype=np.float64)
                if proj is None:
                    ax.imshow(_mosaic(x, mixture.image_shape), cmap="gray", vmin=0, vmax=1)
                else:
                    pts = x[:max_points] @ proj
                    pts = pts[np.isfinite(pts).all(1)]
                    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.35, color="C0", linewidths=0)
                    ax.scatter(means2[:, 0], means2[:, 1], s=12, marker="x", color="C3")
                    ax.set_xlim(-spread, spread)
                    ax.set_ylim(-spread, spread)
                    ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            name = titles.get(method, method)
            if transpose:
                if j == 0:
                    ax.set_title(name, fontsize=9)
                if i == 0:
                    ax.set_ylabel(f"T = {T}", fontsize=9)
            else:
                if i == 0:
                    ax.set_title(f"T = {T}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(name, fontsize=9)
    return _save(fig, path)


def metrics_vs_steps(
    summary: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    methods: Sequence[str],
    steps: Sequence[int],
    path: str | os.PathLike,
    *,
    metrics: Sequence[str] = ("sw", "sw_removed", "precision", "recall", "kl", "spread",
                              "logp_mean", "nonfinite"),
) -> str:
    """One panel per metric (in ``metrics`` order, those the summary has): mean ± std over seeds
    against the number of steps, every row of ``methods`` (:func:`_panel`), one legend beside
    the panels.

    ``summary[method][str(T)][metric] = [mean, std]`` (as :func:`ldm_smd.eval.bench_report.
    aggregate` writes it).
    """
    metrics = [m for m in metrics if any(
        m in summary.get(meth, {}).get(str(T), {}) for meth in methods for T in steps)]
    cols = min(4, max(1, len(metrics)))
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for k, metric in enumerate(metrics):
        ax = axes[k // cols][k % cols]
        _panel(ax, summary, methods, steps, metric)
        if metric.endswith("_removed"):
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
    for k in range(len(metrics), rows * cols):
        axes[k // cols][k % cols].axis("off")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), fontsize=8, loc="center left",
                   bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path, tight=True)


def families_vs_steps(
    summaries: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]],
    methods: Sequence[str],
    path: str | os.PathLike,
    *,
    metrics: Sequence[str] = ("sw_removed", "sw"),
) -> str:
    """Several benchmarks side by side: one column per benchmark (``summaries[name]`` as in
    :func:`metrics_vs_steps`, its steps read from it), one row per metric."""
    names = list(summaries)
    fig, axes = plt.subplots(len(metrics), len(names), squeeze=False,
                             figsize=(3.6 * len(names), 2.9 * len(metrics)))
    for col, name in enumerate(names):
        summary = summaries[name]
        steps = sorted({int(T) for meth in methods for T in summary.get(meth, {})})
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            _panel(ax, summary, methods, steps, metric)
            if metric == "sw_removed":
                ax.axhline(0.0, color="black", lw=0.8)
            if metric == "sw":
                ax.set_yscale("log")
            ax.set_title(f"{name}: {METRIC_LABELS.get(metric, metric)}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    return _save(fig, path)


def _panel(ax, summary, methods: Sequence[str], steps: Sequence[int], metric: str) -> None:
    """Mean ± std over seeds of ``metric`` against the number of steps, one series per method.

    The steps stand evenly spaced (a category each, labelled with T), and within a step each
    method has its own small offset, so rows with equal values (a reference row, or every row
    when there is one T) stand side by side instead of hiding each other; a series joins its
    points across steps. Reference rows (no training) are dashed with hollow markers. A metric
    with a ``<metric>_floor`` companion draws it dotted."""
    steps = list(steps)
    drawn = [m for m in methods if any(metric in summary.get(m, {}).get(str(T), {})
                                       for T in steps)]
    width = 0.7 / max(1, len(drawn))
    for n, method in enumerate(methods):
        if method not in drawn:
            continue
        ts = [T for T in steps if metric in summary.get(method, {}).get(str(T), {})]
        offset = (drawn.index(method) - (len(drawn) - 1) / 2) * width
        xs = np.array([steps.index(T) for T in ts], dtype=float) + offset
        mean = np.array([summary[method][str(T)][metric][0] for T in ts], dtype=float)
        std = np.array([summary[method][str(T)][metric][1] for T in ts], dtype=float)
        reference = method in REFERENCE_ROWS
        ax.errorbar(xs, mean, yerr=std, label=method, ls="--" if reference else "-",
                    marker="o", ms=4, capsize=2, color=f"C{n % 10}",
                    mfc="white" if reference else f"C{n % 10}")
        floors = [summary[method][str(T)].get(f"{metric}_floor", [np.nan])[0] for T in ts]
        if np.isfinite(floors).any():
            ax.plot(xs, floors, ls=":", marker="_", ms=8, lw=1, color="gray")
    ax.set_xticks(range(len(steps)))
    ax.set_xticklabels([str(s) for s in steps])
    ax.set_xlim(-0.5, len(steps) - 0.5)
    ax.set_xlabel("steps T")
    ax.grid(alpha=0.3, axis="y")


def image_grid(images: np.ndarray, path: str | os.PathLike, *, nrow: int = 10,
               min_width: int = 400, padding: int = 2) -> str:
    """Tile uint8 images ``(N, H, W, C)`` (or ``(N, H, W)``) ``nrow`` to a row on a white
    background and upscale the picture by a whole factor (nearest neighbour, so pixels stay
    sharp) until it is at least ``min_width`` pixels wide; written as a PNG."""
    from PIL import Image

    arr = np.asarray(images, dtype=np.uint8)
    if arr.ndim == 3:
        arr = arr[..., None]
    n, h, w, c = arr.shape
    cols = max(1, min(nrow, n))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255,
                   np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, math.ceil(min_width / picture.width))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return str(path)


def _save(fig, path: str | os.PathLike, *, tight: bool = False) -> str:
    """Write ``fig`` as a PNG; ``tight``: crop to what is drawn (keeps a legend placed beside
    the panels)."""
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight" if tight else None)
    plt.close(fig)
    return str(path)


def metric_against_steps(
    table: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike,
    *,
    ylabel: str,
    title: str = "",
) -> str:
    """Simple curves ``table[label][steps] = value`` (the FID-vs-steps sweep plot)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in table.items():
        xs = sorted(values)
        ax.plot(xs, [values[x] for x in xs], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
