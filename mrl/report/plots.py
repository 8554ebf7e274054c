"""Figures written as PNG files: what the blog showed (PCA of embedding prefixes), accuracy against dim, and
retrieval grids (a query beside its nearest images at a few prefix sizes)."""

from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # files only: training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def pca_2d(x):
    """The first two principal components of the rows of x."""
    x = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return (x @ v[:2].T).float()


def pca_scatter(embeddings, labels, dims, class_names, path, title="PCA of embedding prefixes"):
    """One panel per dim d: the 2-D PCA of z[:, :d], coloured by class."""
    fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims), 3.4), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for ax, d in zip(axes[0], dims):
        points = pca_2d(embeddings[:, :d]).numpy()
        for c, name in enumerate(class_names[:20]):
            mask = (labels == c).numpy()
            ax.scatter(points[mask, 0], points[mask, 1], s=4, alpha=0.6, color=cmap(c % cmap.N), label=name)
        ax.set_title(f"d = {d}")
        ax.set_xticks([]), ax.set_yticks([])
    if len(class_names) <= 20:
        axes[0][-1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(title)
    return _save(fig, path)


def accuracy_vs_dim(curves, path, ylabel="accuracy", title="Accuracy against embedding dim"):
    """curves: {label: (dims, values)}; log2 x-axis, one line per label."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (dims, values) in curves.items():
        ax.plot(dims, values, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dim d (prefix)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path, ax)


# the comparison's line style per family: MRL solid, MRL-E dashed, FF dash-dot squares, the baseline's PCA dotted
FAMILY_STYLES = {"MRL": ("-", "o"), "MRL-E": ("--", "^"), "FF": ("-.", "s"), "baseline": (":", "x")}


def comparison_figure(series, title="Top-1 against embedding dim"):
    """The MRL paper's Figure 2: series [{name, family, dims, top1}], one line each against log2 dim. Returns the
    figure (comparison saves it)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in series:
        linestyle, marker = FAMILY_STYLES.get(s["family"], ("-", "o"))
        ax.plot(s["dims"], [100 * v for v in s["top1"]], linestyle=linestyle, marker=marker, label=s["name"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("representation size d")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    return fig


def comparison(series, path, title="Top-1 against embedding dim"):
    fig = comparison_figure(series, title)
    return _save(fig, path, fig.axes[0])


def adaptive_classification(cascades, fixed, path, title="Adaptive classification (cascade over dims)"):
    """cascades: {label: (expected_dims, accuracies)}, one point per confidence threshold; fixed: {label: (dims,
    accuracies)} of always using one dim, drawn dashed for comparison. log2 x-axis."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (dims, values) in fixed.items():
        ax.plot(dims, values, linestyle="--", marker=".", alpha=0.7, label=label)
    for label, (dims, values) in cascades.items():
        order = sorted(range(len(dims)), key=lambda i: dims[i])
        ax.plot([dims[i] for i in order], [values[i] for i in order], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expected dims per sample")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    return _save(fig, path, ax, legend_fontsize=7)


def adaptive_retrieval(points, path, metric, title="Adaptive retrieval: shortlist with d_s, rerank with full d"):
    """points: {label: [(speedup, value, shortlist_dim)]}; one marker per shortlist dim, annotated with it; the
    full-dim exact search is the point at speedup 1."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, rows in points.items():
        rows = sorted(rows)
        line = ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=label)[0]
        for speedup, value, dim in rows:
            ax.annotate(f"{dim}", (speedup, value), textcoords="offset points", xytext=(3, 3), fontsize=7,
                        color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("measured speedup over exact full-dim search (x)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    return _save(fig, path, ax, legend_fontsize=7)


PRECISION_MARKERS = {"float32": "o", "int8": "s", "binary": "^"}


def quantized_retrieval(rows_by_run, path, metric, shortlist, title="What an index's bytes buy"):
    """rows_by_run: {label: [{"bytes_per_image", "precision", "shortlist_dim", metric}]}; one marker per (shortlist
    dim, precision) -- its shape the precision, its note the dim -- and each run's Pareto front as a line (the best
    `metric` for the bytes), on a log-2 axis of bytes per image."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in rows_by_run.items():
        front = sorted(pareto(rows, metric), key=lambda r: r["bytes_per_image"])
        line = ax.plot([r["bytes_per_image"] for r in front], [r[metric] for r in front], "-", alpha=0.7,
                       label=f"{label} (line: Pareto front)")[0]
        for r in rows:
            ax.plot(r["bytes_per_image"], r[metric], PRECISION_MARKERS.get(r["precision"], "o"),
                    color=line.get_color(), markersize=5 if r in front else 3.5, alpha=1 if r in front else 0.5)
            if r in front:
                ax.annotate(str(r["shortlist_dim"]), (r["bytes_per_image"], r[metric]), textcoords="offset points",
                            xytext=(3, -9), fontsize=6, color=line.get_color())
    for precision, marker in PRECISION_MARKERS.items():
        ax.plot([], [], marker, color="gray", label=precision)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per image in the shortlist index (log 2)")
    ax.set_ylabel(f"{metric} of the full-dim float32 search")
    ax.set_title(f"{title} (shortlist {shortlist}, re-ranked in float32 at full d)", fontsize=9)
    return _save(fig, path, ax, legend_fontsize=7)


def pareto(rows, metric):
    """The rows no other row beats: fewer bytes for at least as much `metric`, or as few bytes for more."""
    return [r for r in rows if not any(
        (o["bytes_per_image"] <= r["bytes_per_image"] and o[metric] > r[metric])
        or (o["bytes_per_image"] < r["bytes_per_image"] and o[metric] >= r[metric]) for o in rows)]


def _save(fig, path, ax=None, legend_fontsize=None):
    """Grid and legend on a line plot's axes (when given), then write the PNG and free the figure."""
    if ax is not None:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- retrieval grids

class Thumb(NamedTuple):
    """One cell of a retrieval grid: an RGB image (PIL image or HxWx3 array; None when it cannot be read), the text
    under it and, when both labels are known, whether its label is the query's (green border) or not (red)."""
    image: object
    caption: str
    match: bool | None = None


# the grid's fixed layout in inches (no tight_layout: every cell has the same size and a known place)
GRID_CELL, GRID_THUMB, GRID_CAPTION = 1.05, 0.85, 0.4  # a column's width, the square thumbnail, the text under it
GRID_LEFT, GRID_TOP, GRID_GAP, GRID_MARGIN = 0.45, 0.45, 0.3, 0.1  # row titles, the title, between queries, edges
GRID_DPI = 100
GRID_PIXELS = 96  # thumbnails are shrunk to at most this many pixels a side before drawing (memory, file size)
BORDERS = {True: "#1a9850", False: "#d73027", None: "#bbbbbb"}  # same label, other label, unknown
QUERY_BORDER = "#2166ac"


def retrieval_grid_figure(blocks, title=None):
    """The retrieval grid as a figure. `blocks`, one per query: (query Thumb, [(row title, [Thumb, ...])]), one row
    per prefix size, each with the query in column 0 and its neighbours after it, most similar first. Blocks are
    stacked top to bottom. Each cell is an axes labelled "query q, row r, column c" (c = 0: the query), so that the
    figure can be read back."""
    rows = sum(len(block_rows) for _, block_rows in blocks)
    columns = 1 + max(len(cells) for _, block_rows in blocks for _, cells in block_rows)
    width = GRID_LEFT + columns * GRID_CELL + GRID_MARGIN
    height = GRID_TOP + rows * (GRID_THUMB + GRID_CAPTION) + (len(blocks) - 1) * GRID_GAP + GRID_MARGIN
    fig = plt.figure(figsize=(width, height))
    if title:
        fig.text(0.5, 1 - GRID_TOP / 2 / height, title, ha="center", va="center", fontsize=8)
    top = height - GRID_TOP  # the top of the next row, in inches from the bottom
    for q, (query, block_rows) in enumerate(blocks):
        for r, (row_title, cells) in enumerate(block_rows):
            bottom = top - GRID_THUMB
            for c, thumb in enumerate([query, *cells]):
                left = GRID_LEFT + c * GRID_CELL + (GRID_CELL - GRID_THUMB) / 2
                ax = fig.add_axes((left / width, bottom / height, GRID_THUMB / width, GRID_THUMB / height),
                                  label=f"query {q}, row {r}, column {c}")
                _draw_thumb(ax, thumb, QUERY_BORDER if c == 0 else BORDERS[thumb.match])
                if c == 0:
                    ax.set_ylabel(row_title, fontsize=8)
            top = bottom - GRID_CAPTION
        top -= GRID_GAP
    return fig


def retrieval_grid(blocks, path, title=None):
    """Write retrieval_grid_figure(blocks, title) as a PNG; returns the path."""
    fig = retrieval_grid_figure(blocks, title)
    fig.savefig(path, dpi=GRID_DPI)
    plt.close(fig)
    return path


def _draw_thumb(ax, thumb, border):
    ax.set_xticks([]), ax.set_yticks([])
    if thumb.image is None:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=7, transform=ax.transAxes)
    else:
        image = thumb.image.copy() if hasattr(thumb.image, "thumbnail") else None
        if image is not None:
            image.thumbnail((GRID_PIXELS, GRID_PIXELS))  # in place, keeps the aspect ratio; never enlarges
        ax.imshow(np.asarray(image if image is not None else thumb.image))
    for spine in ax.spines.values():
        spine.set_edgecolor(border)
        spine.set_linewidth(3)
    ax.set_xlabel(thumb.caption, fontsize=7, color="black" if thumb.match is None else border, labelpad=2)
