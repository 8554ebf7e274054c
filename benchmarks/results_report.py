#!/usr/bin/env python
"""The result tables of docs/results.md, the README's headline and their figures, from what the result scripts
measured:

  --cifar100 DIR   benchmarks/cifar100_results.sh's folder: the paper's per-dim comparison on CIFAR-100 (docs/results.md
                   and the README's headline, docs/results_cifar100.png) and where MRL's property emerges with training
                   length (docs/emergence.png)
  --cifar10 DIR    benchmarks/cpu_results.sh's folder: the CIFAR-10 supervised and self-supervised tables
                   (docs/results.md, docs/results.png)

Each table is written between its marker lines (`<!-- NAME:start -->` ... `<!-- NAME:end -->`) and says the commit and
date it was measured at, so that a table never outlives the code that made it without saying so. What a table "shows"
is computed from its numbers here, never written in advance.

    python benchmarks/results_report.py --cifar100 runs/cifar100_results --cifar10 runs/cpu_results
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
sys.path.insert(0, str(ROOT))
from mrl.report import plots  # noqa: E402

SSL_METHODS = ("ReLIC", "SimCLR", "BYOL", "VICReg", "Barlow Twins")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar100", type=Path, help="cifar100_results.sh's output folder")
    parser.add_argument("--cifar10", type=Path, help="cpu_results.sh's output folder")
    args = parser.parse_args()
    if not (args.cifar100 or args.cifar10):
        parser.error("give --cifar100 DIR, --cifar10 DIR or both")
    if args.cifar10:
        folder = args.cifar10
        supervised = json.loads((folder / "eval_supervised" / "results.json").read_text())
        ssl = json.loads((folder / "eval_ssl" / "results.json").read_text())
        stamp = f"commit {(folder / 'commit.txt').read_text().strip()}, {(folder / 'date.txt').read_text().strip()}"
        figure(supervised, ssl, ROOT / "docs" / "results.png")
        replace_between(ROOT / "docs" / "results.md", "cpu_results",
                        full_tables(supervised, ssl, stamp, minutes(folder)))
        print(f"wrote docs/results.png and the CIFAR-10 tables of docs/results.md ({stamp})")
    if args.cifar100:
        cifar100_report(args.cifar100)


def minutes(folder):
    """The stages' total time, in minutes (timings.txt: one `stage seconds s [commit]` line per stage)."""
    return sum(int(line.split()[1]) for line in (folder / "timings.txt").read_text().splitlines() if line.strip()) / 60


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


def full_tables(supervised, ssl, stamp, total_minutes):
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
    return (f"Measured at {stamp} by `bash benchmarks/cpu_results.sh` ({total_minutes:.0f} minutes on the 2-core CPU "
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
    left.plot([k for k, _ in ff], [100 * v for _, v in ff], "s", color="black",
              label="FF-d heads (a run per d; the baseline at full d)")
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


# ---- CIFAR-100 (benchmarks/cifar100_results.sh)

CURVE_DIMS = (8, 16)  # the dims the emergence curves follow


def command(folder, budget):
    """The cifar100_results.sh command line that trains what `folder` holds (its variants and epochs): the
    script's defaults, read from the script itself, and the overrides where the folder differs from them."""
    script = (ROOT / "benchmarks" / "cifar100_results.sh").read_text()
    defaults = re.search(r"VARIANTS:-([^}]*)}", script).group(1).split()
    epochs = int(re.search(r"EPOCHS=\$\{EPOCHS:-(\d+)\}", script).group(1))
    trained = {p.parent.name for p in folder.glob("*/metrics.json")}
    present = [v for v in defaults if (f"seed{v.split(':')[1]}_{v.split(':')[0]}" if ":" in v else v) in trained]
    env = ([f"EPOCHS={budget}"] if budget != epochs else []) + (
        [f'VARIANTS="{" ".join(present)}"'] if present != defaults else [])
    return " ".join([*env, "bash benchmarks/cifar100_results.sh"])


def cifar100_report(folder):
    # MRL and the baseline (every protocol) in eval_final/, each other variant in an eval_<variant>/ of its own
    final = json.loads((folder / "eval_final" / "results.json").read_text())
    for path in sorted(folder.glob("eval_*/results.json")):
        if not re.fullmatch(r"eval_(final|epoch\d+|seed\d+)", path.parent.name):
            final["runs"] += json.loads(path.read_text())["runs"]
    epochs = {int(p.name.removeprefix("eval_epoch")): json.loads((p / "results.json").read_text())
              for p in sorted(folder.glob("eval_epoch*")) if (p / "results.json").is_file()}
    histories = {name: json.loads((folder / name / "metrics.json").read_text())
                 for name in ("mrl", *(f"ff{d}" for d in CURVE_DIMS))}
    budget = len(histories["mrl"]["history"])
    epochs[budget] = final  # the last point of the curves: the comparison itself
    seeds = {}  # {seed: results} from eval_seed<seed>[_<variant>]/, the second seed's runs
    for path in sorted(folder.glob("eval_seed*/results.json")):
        seed = int(re.fullmatch(r"eval_seed(\d+)(_.+)?", path.parent.name).group(1))
        seeds.setdefault(seed, {"runs": []})["runs"] += json.loads(path.read_text())["runs"]
    # the commit the script started at, and those a resumed stage ran at (timings.txt's last column)
    commits = {(folder / "commit.txt").read_text().strip()} | {
        line.split()[3] for line in (folder / "timings.txt").read_text().splitlines() if len(line.split()) > 3}
    stamp = (f"commit{'s' if len(commits) > 1 else ''} {', '.join(sorted(commits))}, "
             f"{(folder / 'date.txt').read_text().strip()}")
    curves = emergence(epochs, histories)
    comparison_figure(final, ROOT / "docs" / "results_cifar100.png")
    emergence_figure(curves, ROOT / "docs" / "emergence.png")
    text = cifar100_tables(final, curves, seeds, stamp, minutes(folder), budget, command(folder, budget))
    replace_between(ROOT / "docs" / "results.md", "cifar100_results", text)
    replace_between(ROOT / "docs" / "results.md", "quantized_results", quantized_tables(final, stamp))
    quantized = {label: run["quantized_retrieval"] for label, run in runs_by_label(final).items()
                 if label in ("MRL", "baseline")}
    plots.quantized_retrieval(quantized, ROOT / "docs" / "quantized_cifar100.png", "recall@10",
                              next(iter(quantized.values()))[0]["shortlist"],
                              title="CIFAR-100: what an index's bytes buy")
    replace_between(ROOT / "README.md", "headline",
                    cifar100_headline(final, curves, seeds, stamp, budget, still_rising(histories["mrl"])))
    print(f"wrote docs/results_cifar100.png, docs/emergence.png and the CIFAR-100 tables of docs/results.md and "
          f"README.md ({stamp})")


def variants(results):
    """{label: run} and the FF-d runs as {d: run}."""
    runs = runs_by_label(results)
    return runs, {run["fixed_feature"]: run for run in results["runs"] if run["family"] == "FF"}


def head_metric(run, d, metric="top1"):
    return dict(zip(run["heads"]["dims"], run["heads"][metric])).get(d)


def ff_head(ff, base, d, metric="top1"):
    """FF-d's head at d: the FF-d run's, and at the full width the baseline's (it is FF-full)."""
    if d in ff:
        return head_metric(ff[d], d, metric)
    return head_metric(base, d, metric) if d == base["embed_dim"] else None


def emergence(epochs, histories):
    """Per training length (epochs) and d: MRL's prefix probe minus the baseline cut to d and its PCA to d (test
    split), and MRL's head minus FF-d's head (validation split: the heads' accuracy each epoch of training)."""
    curves = {}
    for d in CURVE_DIMS:
        rows = []
        for epoch, results in sorted(epochs.items()):
            runs = runs_by_label(results)
            mrl, base = column(runs["MRL"], "probe"), runs["baseline"]
            rows.append({"epoch": epoch, "mrl_probe": mrl[d], "cut": column(base, "probe")[d],
                         "pca": column(base, "pca_probe")[d]})
        mrl = histories["mrl"]
        mrl_heads = {row["epoch"]: dict(zip(mrl["dims"], row["val_accuracy"]))[d] for row in mrl["history"]}
        ff_heads = {row["epoch"]: row["val_accuracy"][0] for row in histories[f"ff{d}"]["history"]}
        heads_rows = [{"epoch": e, "mrl_head": mrl_heads[e], "ff_head": ff_heads[e]}
                      for e in sorted(set(mrl_heads) & set(ff_heads))]
        curves[d] = {"probes": rows, "heads": heads_rows}
    return curves


def turn(points):
    """The first epoch from which a gap stays above zero, or None."""
    for i, (epoch, _) in enumerate(points):
        if all(gap > 0 for _, gap in points[i:]):
            return epoch
    return None


def pts(value):
    return f"{100 * value:+.1f}"


def cifar100_tables(final, curves, seeds, stamp, total_minutes, budget, run_by):
    runs, ff = variants(final)
    mrl, base = runs["MRL"], runs["baseline"]
    tied = [runs["MRL-E"]] if "MRL-E" in runs else []  # a column only where the run was trained (VARIANTS=...)
    e_col = ["MRL-E"] if tied else []
    dims = [d for d in mrl["dims"]]
    both = lambda top1, top5: "" if top1 is None else f"{top1:.3f} / {top5:.3f}"  # noqa: E731
    heads_rows = [[str(d), both(head_metric(mrl, d), head_metric(mrl, d, "top5")),
                   *(both(head_metric(run, d), head_metric(run, d, "top5")) for run in tied),
                   both(ff_head(ff, base, d), ff_head(ff, base, d, "top5")),
                   pts(head_metric(mrl, d) - ff_head(ff, base, d)) if ff_head(ff, base, d) is not None else ""]
                  for d in dims]
    probe_rows = [[str(d), both(column(mrl, "probe")[d], column(mrl, "probe_top5")[d]),
                   *(both(column(run, "probe")[d], column(run, "probe_top5")[d]) for run in tied),
                   both(column(base, "probe")[d], column(base, "probe_top5")[d]),
                   both(column(base, "pca_probe")[d], column(base, "pca_probe_top5")[d]),
                   pts(column(mrl, "probe")[d] - column(base, "probe")[d]),
                   pts(column(mrl, "probe")[d] - column(base, "pca_probe")[d])] for d in dims]
    retrieval_rows = [[str(d), fmt(column(mrl, "map@10")[d]), *(fmt(column(run, "map@10")[d]) for run in tied),
                       fmt(column(base, "map@10")[d]), fmt(column(base, "pca_map@10")[d])] for d in dims]
    small = dims[0]
    seed_table, spread = seed_spread(final, seeds, dims)
    says = [says_heads(mrl, ff, base, dims, spread), says_probes(mrl, base, small, spread)]
    emerge = []
    for d, curve in curves.items():
        cut = [(r["epoch"], r["mrl_probe"] - r["cut"]) for r in curve["probes"]]
        pca = [(r["epoch"], r["mrl_probe"] - r["pca"]) for r in curve["probes"]]
        head = [(r["epoch"], r["mrl_head"] - r["ff_head"]) for r in curve["heads"]]
        emerge.append(f"| {d} | " + " | ".join(
            " ".join(f"{e}: {pts(g)}" for e, g in points) + f" ({describe_turn(points)})"
            for points in (cut, pca, head)) + " |")
    return (f"Measured at {stamp} by `{run_by}` on the 2-core CPU machine (its stages' times sum to "
            f"{total_minutes:.0f} minutes; trainings ran several at a time): CIFAR-100, all 45,000 training images "
            "(5,000 held out for validation) at 32 px, "
            f"ResNet-18 with the ImageNet stem (512-d embedding), {budget} epochs, batch 128, AdamW 2e-3, the blog's "
            "ExponentialLR (x0.85 per epoch), seed 0; evaluated by `evaluate.py` on the 10,000 test images (probes "
            "fitted on the 45,000). FF-d: a run trained with one head on the first d dims (the baseline is FF-512).\n\n"
            "**Heads against heads** (each model's own classifier, test top-1 / top-5):\n\n"
            + table(["d", "MRL head", *(f"{c} head" for c in e_col), "FF-d head", "MRL - FF-d, pt"], heads_rows)
            + "\n\n"
            "**Probes against probes** (a linear probe on the d-dim embedding, test top-1 / top-5):\n\n"
            + table(["d", "MRL prefix", *(f"{c} prefix" for c in e_col), "baseline cut to d", "baseline PCA to d",
                     "MRL - cut, pt", "MRL - PCA, pt"], probe_rows) + "\n\n"
            "**Retrieval** (test images as queries against the training images, mAP@10 of the d-dim prefix, same "
            "label = relevant):\n\n"
            + table(["d", "MRL", *e_col, "baseline cut to d", "baseline PCA to d"], retrieval_rows) + "\n\n"
            + (seed_table + "\n\n" if seed_table else "")
            + "What it shows: " + " ".join(says) + "\n\n"
            "**Where it emerges**: the gaps after each epoch of training (the runs' checkpoints: under this schedule "
            "the checkpoint after epoch k is a k-epoch run), in points -- MRL's prefix probe minus the baseline cut "
            "to d and minus its PCA to d (test split), and MRL's head minus FF-d's head (validation split, measured "
            "as they trained):\n\n"
            "| d | MRL - cut (probe) | MRL - PCA (probe) | MRL head - FF-d head |\n|---:|---|---|---|\n"
            + "\n".join(emerge) + "\n\n![the gaps against training length](emergence.png)")


def describe_turn(points):
    epoch = turn(points)
    if epoch is None:
        return "below zero at the end" if points[-1][1] <= 0 else "not above zero for good"
    return "above zero throughout" if epoch == points[0][0] else f"above zero from epoch {epoch}"


def says_heads(mrl, ff, base, dims, spread):
    gaps = {d: head_metric(mrl, d) - ff_head(ff, base, d) for d in dims if ff_head(ff, base, d) is not None}
    ahead = [d for d, gap in gaps.items() if gap >= 0.005]
    behind = [d for d, gap in gaps.items() if gap <= -0.005]
    level = [d for d in gaps if d not in ahead and d not in behind]
    parts = [f"{what} at d = {', '.join(f'{d} ({pts(gaps[d])})' for d in where)}"
             for what, where in (("ahead", ahead), ("level (within half a point)", level), ("behind", behind)) if where]
    verdict = (f" One MRL model matches or beats the {len(gaps)} models trained one per d." if not behind else
               f" One MRL model falls short of the {len(gaps)} models trained one per d." if not ahead + level else "")
    return (f"MRL's heads against separately trained FF-d heads (the baseline is FF-{base['embed_dim']}), in points: "
            f"{'; '.join(parts)}.{verdict}" + within_spread(gaps, spread))


def says_probes(mrl, base, d, spread):
    probe, cut, pca = column(mrl, "probe")[d], column(base, "probe")[d], column(base, "pca_probe")[d]
    noise = (f"; the seed spread at d = {d} is {100 * spread[d]:.1f} points" if d in spread else "")
    return (f"At d = {d}, MRL's prefix probes at {probe:.3f}, the baseline's embedding cut to {d} at {cut:.3f} "
            f"({pts(probe - cut)} points for MRL) and reduced to {d} by PCA at {pca:.3f} ({pts(probe - pca)}{noise}).")


SEED_COLUMNS = {  # the columns a second seed repeats: (run, how its value at d is read)
    "MRL head": ("MRL", lambda run, d: head_metric(run, d)),
    "MRL prefix (probe)": ("MRL", lambda run, d: column(run, "probe")[d]),
    "baseline cut (probe)": ("baseline", lambda run, d: column(run, "probe")[d]),
    "baseline PCA (probe)": ("baseline", lambda run, d: column(run, "pca_probe")[d])}


def seed_spread(final, seeds, dims):
    """The second seed's runs against the first: a table of each repeated column (and, where the baseline was trained
    again too, of the differences the comparison reads: MRL's prefix minus the cut baseline, minus its PCA) at both
    seeds, and {d: the largest change of any repeated column between seeds} -- the spread a difference must exceed to
    be more than noise. With MRL alone trained again, that is MRL's spread only: a lower bound on a difference's."""
    first = runs_by_label(final)
    rows, spread, header, again = [], {}, [], {}
    for seed, results in sorted(seeds.items()):
        again = {run["label"].split(" (seed")[0]: run for run in results["runs"]}
        columns = {name: (who, read) for name, (who, read) in SEED_COLUMNS.items() if who in again}
        if "MRL" not in again:
            continue
        header = ["d", *(f"{name}, seeds 0 / {seed}" for name in columns)]
        if "baseline" in again:
            header += ["MRL - cut, pt", "MRL - PCA, pt"]
        header.append("spread, pt")
        for d in dims:
            pairs = {name: (read(first[who], d), read(again[who], d)) for name, (who, read) in columns.items()}
            pairs = {name: pair for name, pair in pairs.items() if None not in pair}
            spread[d] = max(spread.get(d, 0), *(abs(a - b) for a, b in pairs.values()))
            row = [str(d), *(" / ".join(fmt(v) for v in pair) for pair in pairs.values())]
            if "baseline" in again:
                probe, cut, pca = (pairs[name] for name in ("MRL prefix (probe)", "baseline cut (probe)",
                                                             "baseline PCA (probe)"))
                row += [f"{pts(probe[0] - cut[0])} / {pts(probe[1] - cut[1])}",
                        f"{pts(probe[0] - pca[0])} / {pts(probe[1] - pca[1])}"]
            rows.append([*row, f"{100 * spread[d]:.1f}"])
    if not rows:
        return "", {}
    trained = " and the baseline" if "baseline" in again else ""
    text = (f"**The second seed** (MRL{trained} trained again with `--seed 1`, evaluated the same way; spread: the "
            "largest change of any repeated column between the seeds, the least a difference above must exceed to "
            "say more than noise" + ("" if trained else "; only MRL was trained again, so it is MRL's own spread, "
                                     "a lower bound on a difference's") + "):\n\n" + table(header, rows))
    return text, spread


def within_spread(gaps, spread):
    """The dims whose gap is smaller than the seed spread there, as a clause (empty without a second seed)."""
    small = [d for d, gap in gaps.items() if d in spread and abs(gap) < spread[d]]
    if not spread:
        return ""
    if not small:
        return " Every one of these gaps exceeds the seed spread at its d."
    return (f" At d = {', '.join(map(str, small))} the gap is smaller than the seed spread there: no difference "
            "shown by one seed.")


def still_rising(history, last=3):
    """Points of validation top-1 the widest head gained per epoch over the run's last `last` epochs."""
    widest = [row["val_accuracy"][-1] for row in history["history"]][-last:]
    return 100 * (widest[-1] - widest[0]) / (len(widest) - 1)


def cifar100_headline(final, curves, seeds, stamp, budget, rising):
    runs, ff = variants(final)
    _, spread = seed_spread(final, seeds, runs["MRL"]["dims"])
    mrl, base = runs["MRL"], runs["baseline"]
    shown = [d for d in mrl["dims"] if d in (8, 16, 32, 64, 512)]
    rows = [[str(d), fmt(head_metric(mrl, d)), fmt(ff_head(ff, base, d)), fmt(column(mrl, "probe")[d]),
             fmt(column(base, "probe")[d]), fmt(column(base, "pca_probe")[d])] for d in shown]
    small = shown[0]
    cut = [(r["epoch"], r["mrl_probe"] - r["cut"]) for r in curves[small]["probes"]]
    return ("![accuracy against dim](docs/results_cifar100.png) "
            "![the gaps against training length](docs/emergence.png)\n\n"
            f"CIFAR-100 test top-1, ResNet-18 (ImageNet stem) at 32 px, {budget} epochs on the 45,000 training images "
            f"({stamp}; [all numbers, the protocols and what they cannot show](docs/results.md#cifar-100-on-a-cpu)). "
            "Heads: each model's own classifier at d; probes: a linear probe on the d-dim embedding.\n\n"
            + table(["d", "MRL head", "FF-d head (a model per d)", "MRL prefix (probe)", "baseline cut to d (probe)",
                     "baseline PCA to d (probe)"], rows) + "\n\n"
            + says_heads(mrl, ff, base, mrl["dims"], spread) + " " + says_probes(mrl, base, small, spread)
            + f" MRL's prefix against the cut baseline at d = {small}, by training length: {describe_turn(cut)} "
              f"({', '.join(f'epoch {e}: {pts(g)}' for e, g in cut)} points)."
            + (f" The runs had not converged (MRL's widest head still gained {rising:.1f} points an epoch at the end): "
               "what a longer budget shows is a GPU's run, `EPOCHS=40 bash benchmarks/cifar100_results.sh`."
               if rising > 0.5 else ""))


def quantized_tables(final, stamp, target=10_000_000):
    """MRL's and the baseline's shortlists at each (dim, precision): recall@10 of the full-dim float32 search against
    bytes per image, and what each index costs at the measured size and at `target` images."""
    runs = runs_by_label(final)
    rows = {label: runs[label]["quantized_retrieval"] for label in ("MRL", "baseline")}
    mrl = {(r["shortlist_dim"], r["precision"]): r for r in rows["MRL"]}
    base = {(r["shortlist_dim"], r["precision"]): r for r in rows["baseline"]}
    front = {label: [(r["shortlist_dim"], r["precision"]) for r in plots.pareto(found, "recall@10")]
             for label, found in rows.items()}
    n, shortlist = rows["MRL"][0]["images"], rows["MRL"][0]["shortlist"]
    scale = target / n
    bold = lambda text, on: f"**{text}**" if on else text  # noqa: E731
    table_rows = []
    for key in sorted(mrl, key=lambda key: (mrl[key]["bytes_per_image"], key[0])):
        m, b = mrl[key], base[key]
        table_rows.append([str(key[0]), key[1], str(m["bytes_per_image"]),
                           bold(f"{m['recall@10']:.3f}", key in front["MRL"]),
                           bold(f"{b['recall@10']:.3f}", key in front["baseline"]),
                           f"{m['map@10']:.3f}", f"{b['map@10']:.3f}", f"{m['index_bytes'] / 2**20:.2f} MiB",
                           f"{m['ms_per_query']:.2f}", size(m["index_bytes"] * scale),
                           f"{m['ms_per_query'] * scale / 1000:.1f} s"])
    cheapest = {label: min((r for r in found if r["recall@10"] >= 0.9), key=lambda r: r["bytes_per_image"],
                           default=None) for label, found in rows.items()}
    says = "; ".join(f"{label} reaches recall@10 >= 0.9 from {r['bytes_per_image']} bytes per image (d = "
                     f"{r['shortlist_dim']}, {r['precision']})" if r else f"{label} never reaches recall@10 0.9"
                     for label, r in cheapest.items())
    return (f"Measured at {stamp} with the CIFAR-100 runs above: the 10,000 test images as queries against the "
            f"{n:,} training images, a shortlist of {shortlist} from the index over the d-dim prefix at each "
            "precision, re-ranked in float32 at d = 512 (exact, flat indexes; mrl/eval/quantized.py). Recall@10: the "
            "share of the full-dim float32 search's top 10 returned; bold: the Pareto front of that run (no pair "
            "gives more recall for as few bytes). Memory and time at 10 million images extrapolate the measured "
            f"ones linearly, as a flat index scans every code: size x {scale:.0f}, time per query x {scale:.0f} "
            "(an upper bound for the re-ranking, whose cost does not grow with the collection; an HNSW graph adds "
            "about 2 x 32 x 4 bytes of links per image and answers in far less than a scan).\n\n"
            + table(["d", "precision", "bytes / image", "MRL recall@10", "baseline recall@10", "MRL mAP@10",
                     "baseline mAP@10", f"MRL index at {n:,}", "ms / query", "index at 10M", "query at 10M"],
                    table_rows)
            + f"\n\nWhat it shows: {says}.\n\n![recall against bytes](quantized_cifar100.png)")


def size(nbytes):
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def comparison_figure(final, path):
    """Test top-1 against log2(d): MRL's and MRL-E's heads, the FF-d points, MRL's prefix probe, and the baseline cut
    to d and reduced by PCA (probes)."""
    runs, ff = variants(final)
    mrl, base = runs["MRL"], runs["baseline"]
    tied = [runs["MRL-E"]] if "MRL-E" in runs else []
    dims = mrl["dims"]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, values, style, marker in [
            ("MRL heads", {d: head_metric(mrl, d) for d in dims}, "-", "o"),
            *(("MRL-E heads", {d: head_metric(run, d) for d in dims}, "--", "^") for run in tied),
            ("MRL prefix (probe)", column(mrl, "probe"), "-", "."),
            ("baseline cut to d (probe)", column(base, "probe"), ":", "x"),
            ("baseline PCA to d (probe)", column(base, "pca_probe"), "-.", "d")]:
        shown = [d for d in dims if values.get(d) is not None]
        ax.plot(shown, [100 * values[d] for d in shown], linestyle=style, marker=marker, label=label)
    points = sorted((d, ff_head(ff, base, d)) for d in dims if ff_head(ff, base, d) is not None)
    ax.plot([d for d, _ in points], [100 * v for _, v in points], "s", color="black",
            label="FF-d heads (a model per d)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("embedding dim d (prefix)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("CIFAR-100, ResNet-18 at 32 px")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def emergence_figure(curves, path):
    """The gaps (points) against training length, one panel per d: MRL's prefix probe minus the baseline cut and
    its PCA, MRL's head minus FF-d's."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.4 * len(curves), 3.4), sharey=True)
    for ax, (d, curve) in zip(axes, curves.items()):
        probes, heads_ = curve["probes"], curve["heads"]
        ax.plot([r["epoch"] for r in probes], [100 * (r["mrl_probe"] - r["cut"]) for r in probes], "-o",
                label="MRL prefix - baseline cut (probe, test)")
        ax.plot([r["epoch"] for r in probes], [100 * (r["mrl_probe"] - r["pca"]) for r in probes], "-.d",
                label="MRL prefix - baseline PCA (probe, test)")
        ax.plot([r["epoch"] for r in heads_], [100 * (r["mrl_head"] - r["ff_head"]) for r in heads_], "--s",
                label=f"MRL head - FF-{d} head (val)")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_title(f"d = {d}")
        ax.set_xlabel("epochs trained")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # epochs are whole
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gap, points of top-1")
    axes[0].legend(fontsize=7)
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
