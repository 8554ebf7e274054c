"""Figures written as PNG files: what the blog showed (PCA of embedding prefixes) and accuracy against dim."""

import matplotlib

matplotlib.use("Agg")  # files only: training nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
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


def _save(fig, path, ax=None, legend_fontsize=None):
    """Grid and legend on a line plot's axes (when given), then write the PNG and free the figure."""
    if ax is not None:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
