"""fidelity_ssl.py's comparison table: per side, metric and dim the mean test accuracy over the training seeds and
their spread, and ours - seed paired by seed against that noise (fidelity.md, fidelity.json)."""

import json
import os
import statistics

METRICS = (("probe", "linear probe"), ("knn", "kNN"), ("pca_probe", "PCA-d probe"))


def per_dim(folder):
    """{metric: {dim: accuracy}} of one evaluated run, or None when it is not evaluated yet."""
    path = os.path.join(folder, "eval", "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = json.load(f)["runs"][0]["per_dim"]
    return {metric: {r["dim"]: r[metric] for r in rows if metric in r} for metric, _ in METRICS}


def summarize(results, seeds, dims):
    """Per side, metric and dim: the mean over its seeds and the seed-to-seed spread (max - min; 0 with one seed);
    per metric and dim: ours - seed, paired by training seed (same subset), averaged, and the noise: the larger of
    the two sides' spreads."""
    summary = {}
    for side, by_seed in results.items():
        summary[side] = {}
        for metric, _ in METRICS:
            summary[side][metric] = {}
            for d in dims:
                values = [by_seed[s][metric][d] for s in seeds if s in by_seed and d in by_seed[s][metric]]
                if values:
                    summary[side][metric][d] = {"mean": statistics.fmean(values), "spread": max(values) - min(values),
                                                "n": len(values), "values": values}
    comparison = {}
    if "ours" in results and "seed" in results:
        for metric, _ in METRICS:
            comparison[metric] = {}
            for d in dims:
                paired = [results["ours"][s][metric][d] - results["seed"][s][metric][d] for s in seeds
                          if s in results["ours"] and s in results["seed"]]
                if paired:
                    noise = max(summary["ours"][metric][d]["spread"], summary["seed"][metric][d]["spread"])
                    mean = statistics.fmean(paired)
                    comparison[metric][d] = {"ours_minus_seed": mean, "paired": paired, "noise": noise,
                                             "beyond_noise": len(paired) > 1 and abs(mean) > noise}
    return summary, comparison


def markdown(summary, comparison, sides, dims):
    lines = []
    for metric, title in METRICS:
        header = ["d", *sides] + (["ours - seed (pt)", "noise (pt)"] if metric in comparison else [])
        lines += [f"**{title}** (test top-1; mean over the seeds a side trained with)", "",
                  "| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for d in dims:
            cells = [str(d)]
            for side in sides:
                entry = summary.get(side, {}).get(metric, {}).get(d)
                cells.append(f"{entry['mean']:.3f}" if entry else "-")
            if metric in comparison:
                c = comparison[metric].get(d)
                cells += [f"{100 * c['ours_minus_seed']:+.1f}{' *' if c['beyond_noise'] else ''}",
                          f"{100 * c['noise']:.1f}" if len(c["paired"]) > 1 else "-"] if c else ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("noise: the larger seed-to-seed spread (max - min over the training seeds) of ours and of the seed at "
                 "that d; * marks |ours - seed| above it.")
    return "\n".join(lines)
