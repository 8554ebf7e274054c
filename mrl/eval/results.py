"""An evaluation's results as a reader gets them: results.json, results.md, PNG plots and the W&B page.

`results` is the dict evaluate.py builds (the dataset and split, the protocols, and per run its per-dim rows and
adaptive curves); it is written to results.json as it is, and everything else here is drawn from it. `args` are
evaluate.py's flags: the output folder and the settings that name the metrics (--retrieval_k, --knn_k, --pca).
"""

import json
import math
import os

from mrl import UserError
from mrl.report import plots
from mrl.report.tracking import (
    log_charts,
    log_image_files,
    log_summary,
    log_table,
    save_file,
    update_config,
    use_model_artifacts,
)
from mrl.run_folder.layout import is_checkpoint

# An adaptive curve's summary point: the cheapest that is within this much of the full-dim result
ADAPTIVE_TOLERANCE = 0.01
# The comparison's series, in the paper's order
FAMILIES = ("MRL", "MRL-E", "FF", "baseline")


def run_family(config):
    """(family, K) of a run, for the comparison: "MRL", "MRL-E", "FF" (fixed feature: one head on the first K dims;
    a run with a single head that is not --baseline is one, whatever flag made it), "baseline" (one head on the whole
    embedding) or "SSL" (no heads); K for FF, otherwise None."""
    heads = config.get("heads")
    if not heads:
        return "SSL", None
    if heads.get("baseline"):
        return "baseline", None
    if heads.get("fixed_feature") or len(heads["dims"]) == 1:
        return "FF", int(heads.get("fixed_feature") or heads["dims"][0])
    return ("MRL-E" if heads.get("tied") else "MRL"), None


def wants_comparison(families):
    """--compare's default: the figure is drawn when there is something to compare, an FF-K run (FF is a set of
    runs) or runs of more than one kind."""
    kinds = {family for family, _ in families if family != "SSL"}
    return "FF" in kinds or len(kinds) > 1


def comparison(args, runs, log=print):
    """The MRL paper's Figure 2 as data: {"series": [{name, family, runs, dims, top1, top5}], "dims": [...]}.

    MRL and MRL-E: each run's heads at their dims. FF: every fixed-feature run is one point, its single head at d=K,
    and the points make one line. baseline: the probe on the baseline's embedding reduced to d by PCA (its
    pca_probe rows). Runs without heads (SSL) have no place in it.
    """
    series = []
    for family in FAMILIES:
        members = [run for run in runs if run.get("family") == family]
        if family == "FF" and members:
            points = {}
            for run in members:
                k = run["fixed_feature"]
                if k in points:
                    raise UserError(f"two fixed-feature runs at K={k} ({points[k][0]}, {run['label']}): the FF line "
                                    "has one point per K; evaluate one of them")
                points[k] = (run["label"], run["heads"]["top1"][0], run["heads"]["top5"][0])
            dims = sorted(points)
            series.append({"name": "FF", "family": family, "runs": [points[k][0] for k in dims], "dims": dims,
                           "top1": [points[k][1] for k in dims], "top5": [points[k][2] for k in dims]})
            continue
        for run in members:
            name = family if len(members) == 1 else f"{family} ({run['label']})"
            if family == "baseline":
                if not args.pca:
                    log(f"comparison: --no-pca leaves out the PCA line of {run['label']}")
                    continue
                rows = [r for r in run["per_dim"] if r.get("pca_probe") is not None]
                series.append({"name": f"{name} PCA", "family": family, "runs": [run["label"]],
                               "dims": [r["dim"] for r in rows], "top1": [r["pca_probe"] for r in rows],
                               "top5": [r.get("pca_probe_top5") for r in rows]})
            else:
                heads = run["heads"]
                series.append({"name": name, "family": family, "runs": [run["label"]], "dims": heads["dims"],
                               "top1": heads["top1"], "top5": heads["top5"]})
    return {"series": series, "dims": sorted({d for s in series for d in s["dims"]})}


def write_outputs(args, results, embeddings):
    """results.json, results.md (also printed) and the plots, in --output_dir; returns {plot name: PNG path}.
    embeddings: {run label: the evaluation split's (features, labels)}, for the 2-D PCA scatter plots."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output_dir {args.output_dir}: {e.strerror}") from None
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    with open(out("results.json"), "w") as f:
        json.dump(results, f, indent=2)
    markdown = results_markdown(args, results)
    with open(out("results.md"), "w") as f:
        f.write(markdown)
    print("\n" + markdown)

    # ---- plots
    k = args.retrieval_k[0]
    runs = results["runs"]
    curve = lambda run, key: ([r["dim"] for r in run["per_dim"] if r.get(key) is not None],  # noqa: E731
                              [r[key] for r in run["per_dim"] if r.get(key) is not None])
    images = {}
    for name, key, ylabel, title in (
            ("accuracy_vs_dim", "probe", "top-1 accuracy", "Linear probe (and heads) against dim"),
            ("knn_vs_dim", "knn", "kNN top-1 accuracy", f"Weighted kNN (k={args.knn_k}) against dim"),
            (f"map_at_{k}_vs_dim", f"map@{k}", f"mAP@{k}", f"Retrieval mAP@{k} against dim")):
        curves = {}
        for run in runs:
            curves[f"{run['label']} ({'probe' if key == 'probe' else key})"] = curve(run, key)
            if args.pca:
                curves[f"{run['label']} PCA"] = curve(run, f"pca_{key}")
            if key == "probe" and any(r.get("head") is not None for r in run["per_dim"]):
                curves[f"{run['label']} heads"] = curve(run, "head")
        images[name] = plots.accuracy_vs_dim(curves, out(f"{name}.png"), ylabel=ylabel,
                                             title=f"{title}, {results['eval_split']} split")
    cascades, fixed = {}, {}
    for run in runs:
        for source in ("heads", "probe"):
            points = run["adaptive_classification"].get(source)
            if points:
                cascades[f"{run['label']} {source} cascade"] = ([p["expected_dim"] for p in points],
                                                                [p["accuracy"] for p in points])
        fixed[f"{run['label']} probe, fixed d"] = curve(run, "probe")
        if "heads_fixed" in run["adaptive_classification"]:
            h = run["adaptive_classification"]["heads_fixed"]
            fixed[f"{run['label']} heads, fixed d"] = (h["dims"], h["accuracy"])
    images["adaptive_classification"] = plots.adaptive_classification(cascades, fixed,
                                                                      out("adaptive_classification.png"))
    if results.get("comparison"):
        images["comparison"] = plots.comparison(
            results["comparison"]["series"], out("comparison.png"),
            title=f"Top-1 against dim, {results['dataset']['dataset']} {results['eval_split']} split")
    if any(run["adaptive_retrieval"] for run in runs):
        images["adaptive_retrieval"] = plots.adaptive_retrieval(
            {run["label"]: [(r["speedup"], r[f"map@{k}"], r["shortlist_dim"]) for r in run["adaptive_retrieval"]]
             for run in runs}, out("adaptive_retrieval.png"), f"mAP@{k}")
    if any(run.get("quantized_retrieval") for run in runs):
        images["quantized_retrieval"] = plots.quantized_retrieval(
            {run["label"]: run["quantized_retrieval"] for run in runs if run.get("quantized_retrieval")},
            out("quantized_retrieval.png"), f"recall@{k}", args.shortlist)
    for run in runs:
        x, y = embeddings[run["label"]]
        dims = run["dims"]
        shown = sorted({dims[0], dims[len(dims) // 3], dims[2 * len(dims) // 3], dims[-1]})
        images[f"pca_scatter/{run['label']}"] = plots.pca_scatter(
            x[:2000], y[:2000], shown, results["class_names"], out(f"pca_scatter_{safe_name(run['label'])}.png"),
            title=f"{run['label']}: {results['eval_split']} embeddings")
    print(f"saved results.json, results.md and {len(images)} plots in {args.output_dir}")
    return images


def results_markdown(args, results):
    """results.md: the per-dim table of every run, the protocols, and each run's adaptive curves as tables. With
    one run in `results["runs"]` it is that run's section of a model card."""
    runs = results["runs"]
    columns = table_columns(args, runs)
    lines = [f"# Accuracy against dimension: {results['dataset']['dataset']}, {results['eval_split']} split", "",
             "| run | dim | " + " | ".join(title for _, title in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for run in runs:
        for r in run["per_dim"]:
            cells = [f"{r[key]:.4f}" if r.get(key) is not None else "" for key, _ in columns]
            lines.append(f"| {run['label']} | {r['dim']} | " + " | ".join(cells) + " |")
    lines += comparison_markdown(results) + robustness_markdown(results)
    lines += ["", "Protocols:", ""] + [f"- **{name}**: {text}" for name, text in results["protocols"].items()]
    k = args.retrieval_k[0]
    for run in runs:
        for source, points in run["adaptive_classification"].items():
            if source == "heads_fixed":
                continue
            lines += ["", f"## {run['label']}: adaptive classification ({source} cascade)", "",
                      "| threshold | expected dims | top-1 |", "|---:|---:|---:|"]
            lines += [f"| {p['threshold'] if p['threshold'] is not None else 'largest dim'} | {p['expected_dim']:.1f} "
                      f"| {p['accuracy']:.4f} |" for p in points]
        if run["adaptive_retrieval"]:
            lines += ["", f"## {run['label']}: adaptive retrieval (shortlist, then re-rank at d={run['embed_dim']})",
                      "", f"| d_s | shortlist | mAP@{k} | P@{k} | top-1 | ms / query | speedup | FLOPs ratio |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['shortlist_dim']} | {r['shortlist'] or 'none (full search)'} | {r[f'map@{k}']:.4f} | "
                      f"{r[f'precision@{k}']:.4f} | {r['top1']:.4f} | {r['ms_per_query']:.3f} | {r['speedup']:.2f} | "
                      f"{r['flops_ratio']:.1f} |" for r in run["adaptive_retrieval"]]
        lines += quantized_markdown(run, k)
    return "\n".join(lines) + "\n"


def quantized_markdown(run, k):
    """A run's quantized shortlists as a table, the Pareto front (the most recall for the bytes) in bold."""
    rows = run.get("quantized_retrieval") or []
    if not rows:
        return []
    front = plots.pareto(rows, f"recall@{k}")
    lines = ["", f"## {run['label']}: quantized shortlists (shortlist {rows[0]['shortlist']} of {rows[0]['images']}, "
             f"re-ranked in float32 at d={run['embed_dim']}; bold: the Pareto front)", "",
             f"| d_s | precision | bytes / image | recall@{k} | mAP@{k} | index size | ms / query |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["bytes_per_image"], r["shortlist_dim"])):
        bold = "**" if r in front else ""
        lines.append(f"| {r['shortlist_dim']} | {r['precision']} | {r['bytes_per_image']} | {bold}{r[f'recall@{k}']:.4f}"
                     f"{bold} | {r[f'map@{k}']:.4f} | {r['index_bytes'] / 2**20:.2f} MiB | {r['ms_per_query']:.3f} |")
    return lines


def comparison_markdown(results):
    """The comparison as a table: one row per dim, top-1 and top-5 of each series (blank where it has no point)."""
    if not results.get("comparison"):
        return []
    series = results["comparison"]["series"]
    lines = ["", f"## Comparison: top-1 / top-5 against dim ({results['eval_split']} split)", "",
             "| dim | " + " | ".join(f"{s['name']} top-1 | {s['name']} top-5" for s in series) + " |",
             "|---:|" + "---:|---:|" * len(series)]
    cell = lambda v: f"{v:.4f}" if v is not None else ""  # noqa: E731
    for d in results["comparison"]["dims"]:
        cells = []
        for s in series:
            i = s["dims"].index(d) if d in s["dims"] else None
            cells += [cell(s["top1"][i]) if i is not None else "", cell(s["top5"][i]) if i is not None else ""]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines


def robustness_rows(results):
    """One row per run and head dim: the head's top-1 on the evaluation split and on each robustness set."""
    rows = []
    for run in results["runs"]:
        for i, d in enumerate(run["heads"]["dims"] if run.get("robustness") else []):
            rows.append({"run": run["label"], "dim": d, results["eval_split"]: run["heads"]["top1"][i],
                         **{name: run["robustness"][name]["top1"][i] for name in results["robustness"]}})
    return rows


def robustness_markdown(results):
    if not results.get("robustness"):
        return []
    sets = results["robustness"]
    lines = ["", "## Robustness: each head's top-1 under distribution shift", "",
             f"| run | dim | {results['eval_split']} | " + " | ".join(s["title"] for s in sets.values()) + " |",
             "|---|---:|---:|" + "---:|" * len(sets)]
    for row in robustness_rows(results):
        lines.append(f"| {row['run']} | {row['dim']} | {row[results['eval_split']]:.4f} | "
                     + " | ".join(f"{row[name]:.4f}" for name in sets) + " |")
    lines += [""] + [f"- {s['title']}: {s['n']} images from {s['source']}"
                     + (" (argmax over its 200 classes)" if s["restricted_to_classes"] else "") for s in sets.values()]
    return lines


def table_columns(args, runs):
    """(key in results.json, column title in results.md) of every per-dim metric that at least one run has (no
    head column for SSL runs alone)."""
    k = args.retrieval_k
    columns = [("probe", "probe top-1"), ("knn", "kNN top-1")]
    columns += [c for kk in k for c in ((f"map@{kk}", f"mAP@{kk}"), (f"precision@{kk}", f"P@{kk}"))]
    if args.pca:
        columns += [("pca_probe", "PCA probe top-1"), ("pca_knn", "PCA kNN top-1"),
                    (f"pca_map@{k[0]}", f"PCA mAP@{k[0]}")]
    columns += [("head", "head top-1")]
    return [c for c in columns if any(r.get(c[0]) is not None for run in runs for r in run["per_dim"])]


def safe_name(label):
    """A run label as part of a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def log_results(args, accelerator, results, images):
    """The W&B page of an evaluation: one native chart per metric with every run (and its PCA baseline, and its
    heads) as a line against log2(dim); the per-dim and adaptive tables; summary numbers per run (every metric at
    every dim, and where each adaptive curve comes within ADAPTIVE_TOLERANCE of the full dim); the plots; results.md
    (with the protocols) on the Files tab; the values the flags resolved to; and the training runs evaluated, with
    their model artifacts as this run's inputs."""
    runs, data = results["runs"], results["dataset"]
    trained = [{"label": run["label"], "checkpoint": run["checkpoint"], **run["wandb"]}
               for run in runs if run.get("wandb")]
    update_config(accelerator, {
        "dataset": data["dataset"], "dataset_path": data["dataset_path"], "val_fraction": data["val_fraction"],
        "test_fraction": data["test_fraction"], "min_image_size": data["min_image_size"], "data": data,
        "eval_split": results["eval_split"], "dims": {run["label"]: run["dims"] for run in runs},
        "image_size": {run["label"]: run["image_size"] for run in runs},
        "split_sizes": {run["label"]: run["n"] for run in runs}, "protocols": results["protocols"],
        "trained_runs": trained, "adaptive_tolerance": ADAPTIVE_TOLERANCE})
    use_model_artifacts(accelerator, [t for t in trained if not is_checkpoint(t["checkpoint"])])  # final models only

    columns = table_columns(args, runs)
    log_table(accelerator, "per_dim", [{"run": run["label"], "dim": r["dim"], "log2_dim": math.log2(r["dim"]),
                                        **{wandb_key(key): r.get(key) for key, _ in columns}}
                                       for run in runs for r in run["per_dim"]], step=0)
    charts = {}
    for key, title in columns:
        if key.startswith("pca_") or key == "head":
            continue  # drawn with their embedding's metric
        series = {}
        for run in runs:
            for name, column in ((run["label"], key), (f"{run['label']} PCA", f"pca_{key}"),
                                 (f"{run['label']} heads", "head" if key == "probe" else None)):
                values = [r.get(column) for r in run["per_dim"]]
                if column and any(v is not None for v in values):
                    series[name] = ([r["dim"] for r in run["per_dim"]], values)
        charts[f"charts/{wandb_key(key)}_vs_dim"] = (f"{title} against log2(dim), {results['eval_split']} split",
                                                      series)
    cascades = {f"{run['label']} {source} cascade": ([p["expected_dim"] for p in points],
                                                      [p["accuracy"] for p in points])
                for run in runs for source, points in run["adaptive_classification"].items() if source != "heads_fixed"}
    charts["charts/adaptive_classification"] = ("adaptive classification: top-1 against log2(expected dims)", cascades)
    if results.get("comparison"):
        series = results["comparison"]["series"]
        charts["charts/comparison_top1"] = (f"top-1 against log2(dim): {', '.join(s['name'] for s in series)}",
                                            {s["name"]: (s["dims"], s["top1"]) for s in series})
        log_table(accelerator, "comparison", [
            {"series": s["name"], "family": s["family"], "dim": d, "log2_dim": math.log2(d), "top1": top1,
             "top5": top5} for s in series for d, top1, top5 in zip(s["dims"], s["top1"], s["top5"])], step=0)
    if results.get("robustness"):
        log_table(accelerator, "robustness", robustness_rows(results), step=0)
    log_charts(accelerator, charts, step=0)

    k = args.retrieval_k[0]
    log_table(accelerator, "adaptive_classification", [
        {"run": run["label"], "cascade": source, "threshold": p["threshold"], "expected_dim": p["expected_dim"],
         "accuracy": p["accuracy"]}
        for run in runs for source, points in run["adaptive_classification"].items() if source != "heads_fixed"
        for p in points], step=0)
    log_table(accelerator, "adaptive_retrieval", [
        {"run": run["label"], **{wandb_key(name): value for name, value in r.items()}}
        for run in runs for r in run["adaptive_retrieval"]], step=0)
    log_table(accelerator, "quantized_retrieval", [
        {"run": run["label"], **{wandb_key(name): value for name, value in r.items()}}
        for run in runs for r in run.get("quantized_retrieval") or []], step=0)
    log_image_files(accelerator, {f"plots/{name}": path for name, path in images.items()}, step=0)
    summary = {f"{run['label']}/{wandb_key(key)}_d{r['dim']}": r[key] for run in runs for r in run["per_dim"]
               for key, _ in columns if r.get(key) is not None}
    for run in runs:
        summary.update(adaptive_summary(run, k))
    summary.update({f"{row['run']}/{name}_top1_d{row['dim']}": row[name]
                    for row in robustness_rows(results) for name in results.get("robustness", {})})
    log_summary(accelerator, summary)
    save_file(accelerator, os.path.join(args.output_dir, "results.md"))


def adaptive_summary(run, k):
    """Where a run's adaptive curves come within ADAPTIVE_TOLERANCE of their full-dim result: the cascade's
    expected dims and top-1, and the retrieval shortlist dim with its speed-up and mAP@k."""
    label, summary = run["label"], {}
    for source, points in run["adaptive_classification"].items():
        if source == "heads_fixed":
            continue
        full = next(p for p in points if p["threshold"] is None)["accuracy"]
        best = min((p for p in points if p["accuracy"] >= full - ADAPTIVE_TOLERANCE), key=lambda p: p["expected_dim"])
        summary.update({f"{label}/adaptive_{source}_expected_dim": best["expected_dim"],
                        f"{label}/adaptive_{source}_accuracy": best["accuracy"],
                        f"{label}/adaptive_{source}_full_dim_accuracy": full})
    rows = run["adaptive_retrieval"]
    if not rows:  # --no-adaptive_retrieval
        return summary
    full = next(r for r in rows if r["shortlist"] is None)[f"map@{k}"]
    best = min((r for r in rows if r[f"map@{k}"] >= full - ADAPTIVE_TOLERANCE), key=lambda r: r["shortlist_dim"])
    summary.update({f"{label}/adaptive_retrieval_shortlist_dim": best["shortlist_dim"],
                    f"{label}/adaptive_retrieval_speedup": best["speedup"],
                    f"{label}/adaptive_retrieval_flops_ratio": best["flops_ratio"],
                    f"{label}/adaptive_retrieval_{wandb_key(f'map@{k}')}": best[f"map@{k}"],
                    f"{label}/full_retrieval_{wandb_key(f'map@{k}')}": full})
    return summary


def wandb_key(key):
    """The W&B name of a results.json key: one scheme, letters, digits and underscores (map@10 -> map_at_10)."""
    return key.replace("@", "_at_")
