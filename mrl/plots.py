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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_dim(curves, path, ylabel="accuracy", title="Accuracy against embedding dim"):
    """curves: {label: (dims, values)}; log2 x-axis, one line per label."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, (dims, values) in curves.items():
        ax.plot(dims, values, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dim d (prefix)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
