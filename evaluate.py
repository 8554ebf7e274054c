#!/usr/bin/env python
"""How good is each prefix z[:, :d] of a trained embedding? Accuracy against dimension, for one or more runs.

For every checkpoint (a folder written by train_supervised.py or train_ssl.py) and every d in --dims:
  probe top-1    offline linear probe on frozen, standardized features (mrl/probe.py; --probe sklearn: the seed's)
  kNN top-1      weighted kNN, cosine on the L2-renormalized prefix, train split as the bank (DINO's eval_knn)
  mAP@k, P@k     retrieval: evaluation images as queries against the train split, relevant = same label
  PCA ...        the same probe / kNN on PCA of the full train embedding reduced to d (the seed's comparison)
  head top-1     supervised runs: each Matryoshka head's own prediction, no probe
and two adaptive-inference curves: classification that cascades from small to large dims until the softmax is
confident, and retrieval that shortlists with a small prefix and re-ranks with the full embedding (timed).

Features are extracted once per checkpoint and split (train, validation, test), with every Accelerate process
embedding its shard, and cached in <checkpoint>/features, so a second evaluation starts from the cache. The
splits are those the run trained with (its config's dataset, seed and fractions), unless flags say otherwise.
Results go to --output_dir: results.json, results.md, PNG plots, and with --report_to wandb a W&B run.

examples:
  python evaluate.py --checkpoint runs/supervised_digits_resnet18
  python evaluate.py --checkpoint runs/mrl runs/baseline runs/mrl_e --labels MRL baseline MRL-E --output_dir runs/cmp
  accelerate launch --multi_gpu evaluate.py --checkpoint runs/relic_r18 --dataset cifar10 \\
      --dataset_path ../shared/data/cifar10 --dims 4,8,12,16,32,64,128,256,512
"""

import argparse
import json
import os
import time

import torch
from accelerate import Accelerator

from mrl import UserError, cli, plots
from mrl.checkpoint import MODEL_FILE, TrainState, load_model, read_config
from mrl.data import ImageTransform, build_transform, load_splits
from mrl.features import cache_key, file_digest, load_or_extract, pca
from mrl.model_card import update_card_with_evaluation
from mrl.models import default_dims
from mrl.probe import L2_GRID, cascade, sklearn_probe, torch_probe
from mrl.retrieval import adaptive_retrieval, neighbor_metrics
from mrl.tracking import init_tracking, log_image_files, log_per_dim_table, log_summary


def get_args_parser():
    parser = argparse.ArgumentParser("evaluate.py", description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="trained model folders (config.json + model.safetensors); several go in one table/plot")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one name per checkpoint for tables and plots (default: the folder names)")
    cli.add_data_args(parser, default_dataset=None)
    parser.set_defaults(val_fraction=None, test_fraction=None)
    for action in parser._actions:  # the data flags default to what the (first) checkpoint trained with
        if action.dest in ("dataset", "dataset_path", "image_size", "val_fraction", "test_fraction"):
            action.help = action.help.split(" (default")[0] + ". Default: the checkpoint's"
    group = parser.add_argument_group("evaluation")
    group.add_argument("--dims", type=cli.parse_dims, nargs="+", default=None,
                       help="prefix sizes to evaluate, any in 1..embedding dim, also outside the training list "
                            "(default: powers of two from 8 up to the embedding dim, plus the heads' dims)")
    group.add_argument("--probe", default="torch", choices=("torch", "sklearn"),
                       help="torch: L-BFGS logistic regression with an L2 grid picked on the validation split "
                            "(fast); sklearn: the seed's CalibratedClassifierCV(LogisticRegression(max_iter=100)) "
                            "on standardized features, fitted on train only, for parity (the seed's notebooks fed "
                            "unstandardized features)")
    group.add_argument("--probe_l2", type=lambda s: [float(v) for v in s.split(",")], default=list(L2_GRID),
                       help="torch probe: comma-separated L2 strengths (per-sample scale; sklearn's C=1 is 1/n)")
    group.add_argument("--probe_max_iter", type=int, default=100, help="torch probe: L-BFGS iterations cap per fit")
    group.add_argument("--knn_k", type=int, default=20, help="kNN neighbours (DINO: 20)")
    group.add_argument("--knn_temperature", type=float, default=0.07, help="kNN vote weight exp(cos / T) (DINO: 0.07)")
    group.add_argument("--retrieval_k", type=int, nargs="+", default=[10],
                       help="cut-offs k of mAP@k and precision@k (the MRL paper reports mAP@10)")
    group.add_argument("--shortlist", type=int, default=200,
                       help="adaptive retrieval: candidates kept by the small prefix for re-ranking at full dim")
    group.add_argument("--index", default="exact", choices=("exact", "hnsw"),
                       help="adaptive retrieval's search: exact (brute force in torch) or hnsw (faiss HNSW graphs over "
                            "each shortlist prefix and over the full embedding, as the MRL paper timed it; for large "
                            "databases)")
    group.add_argument("--pca", action=argparse.BooleanOptionalAction, default=True,
                       help="also evaluate the PCA baseline (PCA of the full train embedding reduced to each d)")
    group = parser.add_argument_group("run and outputs")
    group.add_argument("--batch_size", type=int, default=256, help="images per forward pass and process (extraction)")
    group.add_argument("--output_dir", default=None,
                       help="where results and plots go (default: <first checkpoint>/eval)")
    group.add_argument("--feature_cache", default=None,
                       help="folder for cached features (default: <checkpoint>/features); 'none' disables the cache")
    group.add_argument("--update_model_card", action="store_true",
                       help="also write each run's per-dim results into its model card (<checkpoint>/README.md, "
                            "the page the Hub shows), replacing those of an earlier evaluation")
    group.add_argument("--report_to", default="auto", choices=("auto", "wandb", "none"),
                       help="auto = W&B when it is configured (logged in, WANDB_API_KEY or WANDB_MODE set)")
    group.add_argument("--wandb_project", default="matryoshka", help="W&B project")
    group.add_argument("--run_name", default=None, help="W&B run name (default: eval_<output folder's parent>)")
    group.add_argument("--seed", type=int, default=0, help="seed of the validation split the probe carves from train "
                       "when the dataset has no test split (the validation split is then the evaluation set)")
    return parser


def main(args):
    check_args(args)
    accelerator = Accelerator(log_with="wandb" if args.report_to == "wandb" else None)
    log = accelerator.print
    models = [load_run(path, accelerator.device) for path in args.checkpoint]
    labels = args.labels
    dims = [resolve_dims(args, path, config, heads) for path, (_, heads, config) in zip(args.checkpoint, models)]

    # ---- data: the splits the (first) run trained with, unless the flags override them
    data = resolve_data(args, [config for _, _, config in models])
    with accelerator.main_process_first():
        splits = load_splits(data["dataset"], data["dataset_path"], seed=data["seed"],
                             val_fraction=data["val_fraction"], test_fraction=data["test_fraction"],
                             max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                             min_image_size=args.min_image_size)
    eval_split = "test" if splits.test is not None else "val"
    class_names = splits.class_names
    log(f"{data['dataset']}: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test) if splits.test is not None else 0} test images, {len(class_names)} classes; "
        f"evaluating on {eval_split}, {accelerator.num_processes} process(es)")

    for path, (_, heads, config) in zip(args.checkpoint, models):
        check_classes(path, heads, config, class_names)

    results = {"dataset": data, "eval_split": eval_split, "class_names": class_names, "protocols": protocols(args),
               "runs": []}
    embeddings = {}  # label -> the evaluation split's (features, labels), for the 2-D PCA scatter plots
    for path, label, (backbone, heads, config), run_dims in zip(args.checkpoint, labels, models, dims):
        # ---- features of every split, from the cache or the model (eval-mode preprocessing on train too)
        start = time.perf_counter()
        features = embed_splits(args, accelerator, path, backbone, config, splits)
        if not accelerator.is_main_process:
            continue  # the evaluation itself runs on the gathered features, in the main process
        log(f"{label}: features ready in {time.perf_counter() - start:.1f} s; evaluating dims {run_dims}")
        run = evaluate_run(args, features, eval_split, heads, run_dims, len(class_names), accelerator.device, log)
        results["runs"].append({"label": label, "checkpoint": path, "kind": config.get("kind"),
                                "embed_dim": config["model"]["embed_dim"], **run})
        embeddings[label] = features[eval_split]

    if accelerator.is_main_process:
        write_outputs(args, accelerator, results, embeddings)
        for run in results["runs"] if args.update_model_card else []:
            card = update_card_with_evaluation(run["checkpoint"], results_markdown(args, {**results, "runs": [run]}),
                                               run["per_dim"], results["eval_split"], args.output_dir)
            log(f"updated the model card {card}")
    accelerator.end_training()


def check_args(args):
    for name in ("knn_k", "shortlist", "batch_size", "probe_max_iter"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.knn_temperature <= 0 or not args.probe_l2 or min(args.probe_l2) < 0:
        raise UserError("--knn_temperature must be positive and --probe_l2 a list of non-negative numbers")
    if any(k < 1 for k in args.retrieval_k):
        raise UserError("--retrieval_k values must be at least 1")
    if args.labels and len(args.labels) != len(args.checkpoint):
        raise UserError(f"--labels has {len(args.labels)} names for {len(args.checkpoint)} checkpoints")
    labels = args.labels or [os.path.basename(os.path.normpath(p)) for p in args.checkpoint]
    if len(set(labels)) < len(labels):
        raise UserError(f"the runs need distinct names, got {labels}: pass --labels")
    args.labels = labels
    if args.report_to == "auto":
        args.report_to = "wandb" if cli.wandb_configured() else "none"
    args.output_dir = args.output_dir or os.path.join(args.checkpoint[0], "eval")
    args.run_name = args.run_name or "eval_" + os.path.basename(os.path.normpath(args.checkpoint[0]))


def load_run(path, device):
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint {path} does not exist (expected a folder written by a training script)")
    read_config(path)  # a clear error for a folder that is not a finished run, or from another format version
    backbone, heads, config = load_model(path)  # on the CPU: safetensors cannot load to a device like "cpu:1"
    return backbone.to(device), heads, config


def resolve_data(args, configs):
    """Dataset and split settings: the flags where given, otherwise the first checkpoint's."""
    data = configs[0]["data"]
    if args.dataset is None:
        others = {c["data"]["dataset"] for c in configs} - {data["dataset"]}
        if others:
            raise UserError(f"the checkpoints were trained on different datasets ({data['dataset']}, "
                            f"{', '.join(sorted(others))}); pass --dataset to evaluate them all on one")
    dataset = args.dataset or data["dataset"]
    same = dataset == data["dataset"]
    return {"dataset": dataset, "dataset_path": args.dataset_path or (data.get("dataset_path") if same else None),
            "seed": data.get("seed", 0),
            "val_fraction": args.val_fraction if args.val_fraction is not None else data.get("val_fraction", 0.1),
            "test_fraction": args.test_fraction if args.test_fraction is not None else data.get("test_fraction", 0.1)}


def check_classes(path, heads, config, class_names):
    """Heads only make sense on the classes they were trained on; a probe can use any labels."""
    if heads is None:
        return
    trained = config["heads"].get("class_names")
    if heads.num_classes != len(class_names) or (trained and list(trained) != list(class_names)):
        raise UserError(f"{path} has heads for {heads.num_classes} classes ({', '.join(map(str, trained or []))[:80]}) "
                        f"but the dataset has {len(class_names)} ({', '.join(map(str, class_names))[:80]}); "
                        "evaluate it on the dataset it was trained on")


def resolve_dims(args, path, config, heads):
    embed_dim = config["model"]["embed_dim"]
    if args.dims:
        dims = sorted({d for group in args.dims for d in group})
    else:
        dims = sorted(set(default_dims(embed_dim)) | set(heads.dims if heads is not None else []))
    if not dims or dims[0] < 1 or dims[-1] > embed_dim:
        raise UserError(f"--dims must lie in 1..{embed_dim}, the embedding dim of {path}; got {dims}")
    return dims


def embed_splits(args, accelerator, path, backbone, config, splits):
    """{split: (features, labels)} for train, val and test, each loaded from the cache or extracted."""
    data = config["data"]
    image_size = args.image_size or data["image_size"]
    try:
        transform = build_transform(data["augment"], image_size, data["mean"], data["std"], train=False)
    except UserError:  # a train-only augmentation name (e.g. SSL's two views): evaluation is the plain resize
        transform = build_transform("none", image_size, data["mean"], data["std"], train=False)
    preprocessing = {"transform": repr(transform), "mixed_precision": accelerator.mixed_precision}
    digest = file_digest(os.path.join(path, MODEL_FILE))
    cache_dir = args.feature_cache or os.path.join(path, "features")
    cache_dir = None if cache_dir.lower() == "none" else cache_dir
    features = {}
    for name in ("train", "val", "test"):
        dataset = getattr(splits, name)
        if dataset is None:
            continue
        dataset.set_transform(ImageTransform(transform))
        cache_file = (os.path.join(cache_dir, f"{name}-{cache_key(digest, name, dataset, preprocessing)}.pt")
                      if cache_dir else None)
        x, y, _ = load_or_extract(accelerator, backbone, dataset, cache_file, args.batch_size, args.num_workers,
                                  log=accelerator.print)
        features[name] = (x, y)
    return features


def evaluate_run(args, features, eval_split, heads, dims, num_classes, device, log):
    """Every metric of one checkpoint; returns the JSON-ready per-dim rows and adaptive curves."""
    train_x, train_y = features["train"]
    eval_x, eval_y = features[eval_split]
    # The torch probe picks its L2 on the validation split; when that split is the evaluation set, it carves its
    # own from train instead.
    val_x, val_y = features["val"] if eval_split == "test" else (None, None)
    rows = {d: {"dim": d} for d in dims}
    timings = {}

    def probe(x_train, x_val, x_eval, name):
        say = lambda line: log(f"{name}: {line}")  # noqa: E731
        if args.probe == "sklearn":
            return sklearn_probe(x_train, train_y, x_eval, eval_y, dims, log=say)
        return torch_probe(x_train, train_y, x_eval, eval_y, dims, num_classes, x_val, val_y, l2_grid=args.probe_l2,
                           max_iter=args.probe_max_iter, seed=args.seed, device=device, log=say)

    def neighbors(x_train, x_eval):
        return neighbor_metrics(x_train, train_y, x_eval, eval_y, dims, num_classes, args.knn_k,
                                args.knn_temperature, args.retrieval_k, device)

    start = time.perf_counter()
    probes = probe(train_x, val_x, eval_x, "embedding")
    timings["probe"] = time.perf_counter() - start
    for p in probes:
        rows[p.dim].update(probe=p.accuracy, probe_l2=p.l2)
    start = time.perf_counter()
    for r in neighbors(train_x, eval_x):
        rows[r["dim"]].update({k: v for k, v in r.items() if k != "dim"})
    timings["knn_retrieval"] = time.perf_counter() - start

    if args.pca:
        start = time.perf_counter()
        pca_train, pca_eval, *pca_val = pca(train_x, eval_x, *([val_x] if val_x is not None else []))
        for p in probe(pca_train, pca_val[0] if pca_val else None, pca_eval, "PCA"):
            rows[p.dim].update(pca_probe=p.accuracy)
        for r in neighbors(pca_train, pca_eval):
            rows[r["dim"]].update({f"pca_{k}": v for k, v in r.items() if k != "dim"})
        timings["pca"] = time.perf_counter() - start

    adaptive = {"probe": cascade([p.probs for p in probes], dims, eval_y)}
    if heads is not None:
        # Each head's own prediction. The heads are linear maps of the embedding, so they run on the cached
        # features (float32) instead of a second pass of the model.
        with torch.no_grad():
            head_logits = heads.to("cpu").float()(eval_x.float())  # (heads, n, classes)
        head_accuracy = [(logits.argmax(-1) == eval_y).float().mean().item() for logits in head_logits]
        for d, accuracy in zip(heads.dims, head_accuracy):
            if d in rows:
                rows[d]["head"] = accuracy
        # the cascade runs over all of the model's heads, whichever dims the table shows
        adaptive["heads"] = cascade([z.softmax(-1) for z in head_logits], heads.dims, eval_y)
        adaptive["heads_fixed"] = {"dims": heads.dims, "accuracy": head_accuracy}

    start = time.perf_counter()
    k = args.retrieval_k[0]
    funnel = adaptive_retrieval(train_x, train_y, eval_x, eval_y, dims, eval_x.shape[1], args.shortlist, k,
                                device=device, index=args.index)
    timings["adaptive_retrieval"] = time.perf_counter() - start
    log("  ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()))
    return {"dims": dims, "per_dim": [rows[d] for d in sorted(rows)], "adaptive_classification": adaptive,
            "adaptive_retrieval": funnel, "seconds": timings,
            "n": {"train": len(train_x), "val": len(features["val"][0]), "eval": len(eval_x)}}


def protocols(args):
    """What produced each number (written next to the results, so that no number is read without it)."""
    k = args.retrieval_k
    probe = ("offline linear probe on frozen features: multinomial logistic regression (torch, L-BFGS) on "
             f"standardized features, L2 in {args.probe_l2} picked by validation cross-entropy"
             if args.probe == "torch" else
             "offline linear probe, the seed's protocol: StandardScaler + CalibratedClassifierCV("
             "LogisticRegression(max_iter=100)), fitted on train")
    described = {
        "probe": probe,
        "knn": f"weighted kNN top-1 (k={args.knn_k}, T={args.knn_temperature}, cosine on the L2-renormalized prefix; "
               "bank: train split)",
        "retrieval": f"queries: evaluation split, database: train split, relevant = same label; precision@k and "
                     f"mAP@k for k in {k} (AP@k divided by min(k, relevant items); map_mrl@k divides by k as the "
                     "MRL paper's code does); top1 = 1-NN accuracy",
        "pca": "PCA of the full train embedding reduced to d, then the same probe / kNN / retrieval",
        "head": "each Matryoshka head's own prediction (no probe; supervised runs only)",
        "adaptive_classification": "cascade from the smallest dim up, stop when the max softmax probability "
                                   "reaches the threshold; accuracy vs expected dims (heads, and the probes)",
        "adaptive_retrieval": f"shortlist {args.shortlist} by the d_s prefix, re-rank by the full embedding; "
                              f"wall-clock per query ({'faiss HNSW' if args.index == 'hnsw' else 'exact torch'} "
                              "search on this machine, median of 3 runs over up to 2000 queries) vs full-dim search "
                              "with the same kind of index",
    }
    return {name: text for name, text in described.items() if name != "pca" or args.pca}


def write_outputs(args, accelerator, results, embeddings):
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
    images["adaptive_retrieval"] = plots.adaptive_retrieval(
        {run["label"]: [(r["speedup"], r[f"map@{k}"], r["shortlist_dim"]) for r in run["adaptive_retrieval"]]
         for run in runs}, out("adaptive_retrieval.png"), f"mAP@{k}")
    for run in runs:
        x, y = embeddings[run["label"]]
        dims = run["dims"]
        shown = sorted({dims[0], dims[len(dims) // 3], dims[2 * len(dims) // 3], dims[-1]})
        images[f"pca_scatter/{run['label']}"] = plots.pca_scatter(
            x[:2000], y[:2000], shown, results["class_names"], out(f"pca_scatter_{safe_name(run['label'])}.png"),
            title=f"{run['label']}: {results['eval_split']} embeddings")
    print(f"saved results.json, results.md and {len(images)} plots in {args.output_dir}")

    # ---- W&B: the same table, the plots and summary numbers on one run page
    if args.report_to == "wandb":
        init_tracking(accelerator, args, TrainState(), {**vars(args), "dataset": results["dataset"]})
        for run in runs:
            columns = [c for c in table_columns(args) if any(r.get(c[0]) is not None for r in run["per_dim"])]
            rows = run["per_dim"]
            log_per_dim_table(accelerator, f"eval/{run['label']}", [r["dim"] for r in rows],
                              {title: [r.get(key) for r in rows] for key, title in columns}, step=0)
        log_image_files(accelerator, images, step=0)
        log_summary(accelerator, {f"{run['label']}/{key}_d{r['dim']}": r[key] for run in runs for r in run["per_dim"]
                                  for key, _ in table_columns(args) if r.get(key) is not None})


def table_columns(args):
    k = args.retrieval_k
    columns = [("probe", "probe top-1"), ("knn", "kNN top-1")]
    columns += [c for kk in k for c in ((f"map@{kk}", f"mAP@{kk}"), (f"precision@{kk}", f"P@{kk}"))]
    if args.pca:
        columns += [("pca_probe", "PCA probe top-1"), ("pca_knn", "PCA kNN top-1"),
                    (f"pca_map@{k[0]}", f"PCA mAP@{k[0]}")]
    return columns + [("head", "head top-1")]


def results_markdown(args, results):
    columns = table_columns(args)
    runs = results["runs"]
    columns = [c for c in columns if any(r.get(c[0]) is not None for run in runs for r in run["per_dim"])]
    lines = [f"# Accuracy against dimension: {results['dataset']['dataset']}, {results['eval_split']} split", "",
             "| run | dim | " + " | ".join(title for _, title in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for run in runs:
        for r in run["per_dim"]:
            cells = [f"{r[key]:.4f}" if r.get(key) is not None else "" for key, _ in columns]
            lines.append(f"| {run['label']} | {r['dim']} | " + " | ".join(cells) + " |")
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
        lines += ["", f"## {run['label']}: adaptive retrieval (shortlist, then re-rank at d={run['embed_dim']})", "",
                  f"| d_s | shortlist | mAP@{k} | P@{k} | top-1 | ms / query | speedup | FLOPs ratio |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['shortlist_dim']} | {r['shortlist'] or 'exact'} | {r[f'map@{k}']:.4f} | "
                  f"{r[f'precision@{k}']:.4f} | {r['top1']:.4f} | {r['ms_per_query']:.3f} | {r['speedup']:.2f} | "
                  f"{r['flops_ratio']:.1f} |" for r in run["adaptive_retrieval"]]
    return "\n".join(lines) + "\n"


def safe_name(label):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


if __name__ == "__main__":
    cli.run(main, get_args_parser().parse_args())
