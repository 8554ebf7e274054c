#!/usr/bin/env python
"""The tables of docs/results.md, the README's headline table and docs/results.png, from what
benchmarks/cpu_results.sh measured (its eval_supervised/ and eval_ssl/ results.json, commit.txt and date.txt).

Each table is written between its marker lines (`<!-- cpu_results:start -->` ... `<!-- cpu_results:end -->` in
docs/results.md, `<!-- headline:start -->` ... `<!-- headline:end -->` in README.md) and says the commit and date it
was measured at, so that a table never outlives the code that made it without saying so.

    python benchmarks/results_report.py runs/cpu_results
"""

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SSL_METHODS = ("ReLIC", "SimCLR", "BYOL", "VICReg", "Barlow Twins")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="cpu_results.sh's output folder")
    args = parser.parse_args()
    folder = Path(args.folder)
    supervised = json.loads((folder / "eval_supervised" / "results.json").read_text())
    ssl = json.loads((folder / "eval_ssl" / "results.json").read_text())
    stamp = f"commit {(folder / 'commit.txt').read_text().strip()}, {(folder / 'date.txt').read_text().strip()}"
    minutes = sum(int(line.split()[1]) for line in (folder / "timings.txt").read_text().splitlines()) / 60

    figure(supervised, ssl, ROOT / "docs" / "results.png")
    replace_between(ROOT / "docs" / "results.md", "cpu_results", full_tables(supervised, ssl, stamp, minutes))
    replace_between(ROOT / "README.md", "headline", headline(supervised, ssl, stamp))
    print(f"wrote docs/results.png and the tables of docs/results.md and README.md ({stamp})")


def runs_by_label(results):
    return {run["label"]: run for run in results["runs"]}


def column(run, key):
    """{dim: value} of a per-dim metric (None where the run has none at that dim)."""
    return {row["dim"]: row.get(key) for row in run["per_dim"]}


def heads(run):
    """{dim: top-1} of a supervised run's own heads (every head, also at dims the table does not show)."""
    return dict(zip(run["heads"]["dims"], run["heads"]["top1"]))


def fmt(value):
    return "" if value is None else f"{value:.3f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def full_tables(supervised, ssl, stamp, minutes):
    sup, self_sup = runs_by_label(supervised), runs_by_label(ssl)
    dims = supervised["runs"][0]["dims"]
    ff = {run["fixed_feature"]: heads(run)[run["fixed_feature"]] for run in supervised["runs"] if run["family"] == "FF"}
    mrl, tied, base = sup["MRL"], sup["MRL-E"], sup["baseline"]
    rows = [[str(d), fmt(heads(mrl).get(d)), fmt(column(mrl, "probe")[d]), fmt(heads(tied).get(d)),
             fmt(column(tied, "probe")[d]), fmt(ff.get(d, heads(base).get(d) if d == dims[-1] else None)),
             fmt(column(base, "probe")[d]), fmt(column(base, "pca_probe")[d]), fmt(column(mrl, "map@10")[d]),
             fmt(column(base, "map@10")[d])] for d in dims]
    supervised_table = table(["d", "MRL heads", "MRL probe", "MRL-E heads", "MRL-E probe", "FF-d head",
                              "baseline probe", "baseline PCA-d probe", "MRL mAP@10", "baseline mAP@10"], rows)
    ssl_rows = []
    for d in dims:
        cells = [str(d)]
        for method in (*SSL_METHODS, "untrained"):
            run = self_sup[method]
            cells.append(f"{fmt(column(run, 'probe')[d])} / {fmt(column(run, 'knn')[d])}")
        ssl_rows.append(cells)
    ssl_table = table(["d", *(f"{m} probe / kNN" for m in SSL_METHODS), "untrained probe / kNN"], ssl_rows)
    pca_rows = [[str(d), *(fmt(column(self_sup[m], "pca_probe")[d]) for m in (*SSL_METHODS, "untrained"))]
                for d in dims]
    pca_table = table(["d", *(f"{m} PCA-d probe" for m in (*SSL_METHODS, "untrained"))], pca_rows)
    small, full = dims[0], dims[-1]
    kept = lambda values: values[small] / values[full]  # noqa: E731
    margins = {m: min(column(self_sup[m], "probe")[d] - column(self_sup["untrained"], "probe")[d] for d in dims)
               for m in SSL_METHODS}
    best = max(SSL_METHODS, key=lambda m: column(self_sup[m], "probe")[full])
    supervised_says = (
        f"What it shows: at d = {small}, MRL's heads keep {kept(heads(mrl)):.0%} of their d = {full} top-1, the "
        f"baseline's embedding cut to {small} keeps {kept(column(base, 'probe')):.0%} (probe) and reduced by PCA "
        f"{kept(column(base, 'pca_probe')):.0%}; FF-{small}, trained for d = {small} alone, reaches "
        f"{ff.get(small, float('nan')):.3f}. What it cannot show: which is best when trained to convergence -- six "
        "epochs on 5,000 16-px images leave every model under-trained, and ten classes need few directions.")
    ssl_says = (
        "What it shows: every method against the untrained network at the same budget -- the smallest margin of its "
        "probe over the untrained one, over all d: " + ", ".join(f"{m} {100 * v:+.1f}" for m, v in margins.items())
        + f" points; {best} is best at d = {full}. What it cannot show: how the methods rank when pre-trained for "
        "hundreds of epochs (two epochs of 3,000 images is the very start of pre-training)" + ema_caveat(ssl) + ".")
    pca_says = ("What it shows: whether a prefix is as good as the best d-dim linear projection of the same "
                "embedding. What it cannot show: PCA needs the full embedding computed first, a prefix does not.")
    return (f"Measured at {stamp} by `bash benchmarks/cpu_results.sh` ({minutes:.0f} minutes on the 2-core CPU "
            "machine); test top-1 on CIFAR-10's 10,000 test images.\n\n"
            f"**Supervised** (6 epochs, batch 128, AdamW 2e-3, the blog's schedule; \"FF-d\": the fixed-feature run "
            f"trained with one head on the first d dims, at d = {', '.join(map(str, sorted(ff)))} and the baseline at "
            f"{full}):\n\n{supervised_table}\n\n{supervised_says}\n\n"
            "**Self-supervised** (2 epochs of 3,000 images, batch 128, each method's defaults; the untrained network "
            "is the same ResNet-18 with `--lr 0`: initial weights, BatchNorm statistics of the training images), "
            f"linear probe / kNN top-1 of the prefix:\n\n{ssl_table}\n\n{ssl_says}\n\n"
            f"The same embeddings reduced to d by PCA instead of cut to d (probe top-1):\n\n{pca_table}\n\n{pca_says}")


def ema_caveat(ssl):
    """The methods that save their EMA target network, and how far that target has moved from the untrained network
    after the run's steps (its momentum starts at --ema_momentum and rises towards 1: at most 1 - m ** steps)."""
    moved = []
    for run in ssl["runs"]:
        folder = Path(run["checkpoint"])
        config = json.loads((folder / "config.json").read_text())
        if (config.get("ssl") or {}).get("exported") == "target" and config["args"]["lr"] > 0:  # not the untrained
            steps = json.loads((folder / "metrics.json").read_text())["steps"]
            moved.append(f"{run['label']} {1 - config['args']['ema_momentum'] ** steps:.0%}")
    if not moved:
        return ""
    return ("; and the methods that save their EMA target network save one that has moved at most this share of the "
            "way from the untrained network to the trained online one: " + ", ".join(moved))


def headline(supervised, ssl, stamp):
    sup, self_sup = runs_by_label(supervised), runs_by_label(ssl)
    dims = supervised["runs"][0]["dims"]
    mrl, base, relic, untrained = sup["MRL"], sup["baseline"], self_sup["ReLIC"], self_sup["untrained"]
    best = max(SSL_METHODS, key=lambda m: column(self_sup[m], "probe")[dims[0]])
    rows = [[str(d), fmt(heads(mrl).get(d)), fmt(column(base, "probe")[d]), fmt(column(base, "pca_probe")[d]),
             fmt(column(relic, "probe")[d]), fmt(column(self_sup[best], "probe")[d]),
             fmt(column(untrained, "probe")[d])] for d in dims]
    best_label = f"{best} probe" if best != "ReLIC" else "ReLIC probe (best)"
    return (f"![accuracy against dim](docs/results.png)\n\n"
            "CIFAR-10 test top-1 at 16 px, ResNet-18; supervised: 6 epochs on 5,000 training images, "
            f"self-supervised: 2 epochs on 3,000, probed on the 5,000 ({stamp}; "
            "[all numbers, settings and what they cannot show](docs/results.md)):\n\n"
            + table(["d", "MRL heads", "baseline cut to d", "baseline PCA to d", "ReLIC-MRL probe", best_label,
                     "untrained probe"], rows))


def figure(supervised, ssl, path):
    """Two panels against log2(d): the supervised comparison (MRL's heads, the baseline cut to d and reduced by PCA,
    the FF-K points) and the self-supervised methods' probes next to the untrained network."""
    sup, self_sup = runs_by_label(supervised), runs_by_label(ssl)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    dims = supervised["runs"][0]["dims"]
    curves = [("MRL heads", heads(sup["MRL"]), "-", "o"), ("MRL-E heads", heads(sup["MRL-E"]), "--", "^"),
              ("baseline cut to d (probe)", column(sup["baseline"], "probe"), ":", "x"),
              ("baseline PCA to d (probe)", column(sup["baseline"], "pca_probe"), "-.", "d")]
    for label, values, style, marker in curves:
        shown = [d for d in dims if values.get(d) is not None]
        left.plot(shown, [100 * values[d] for d in shown], linestyle=style, marker=marker, label=label)
    ff = sorted([(run["fixed_feature"], heads(run)[run["fixed_feature"]]) for run in supervised["runs"]
                 if run["family"] == "FF"] + [(dims[-1], heads(sup["baseline"])[dims[-1]])])  # the baseline is FF-full
    left.plot([k for k, _ in ff], [100 * v for _, v in ff], "s", color="black", label="FF-d heads (a run per d; the baseline at full d)")
    left.set_title("supervised, CIFAR-10 at 16 px")
    for method in (*SSL_METHODS, "untrained"):
        values = column(self_sup[method], "probe")
        right.plot(dims, [100 * values[d] for d in dims], marker="o" if method != "untrained" else "x",
                   linestyle="-" if method != "untrained" else ":", color="gray" if method == "untrained" else None,
                   label=method if method != "untrained" else "untrained network")
    right.set_title("self-supervised (linear probe on the prefix)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel("embedding dim d (prefix)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel("test top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def replace_between(path, name, text):
    """Put `text` between the marker lines <!-- name:start --> and <!-- name:end --> of the file at `path`."""
    content = path.read_text()
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(content):
        sys.exit(f"{path} has no <!-- {name}:start --> / <!-- {name}:end --> markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), content))


if __name__ == "__main__":
    main()
