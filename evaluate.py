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
Results go to --output_dir: results.json, results.md, PNG plots, and with --report_to wandb a W&B run
(mrl/eval_report.py).

examples:
  python evaluate.py --checkpoint runs/supervised_mrl_digits_resnet18
  python evaluate.py --checkpoint runs/mrl runs/baseline runs/mrl_e --labels MRL baseline MRL-E --output_dir runs/cmp
  accelerate launch --multi_gpu evaluate.py --checkpoint runs/relic_r18 --dataset cifar10 \\
      --dataset_path ../shared/data/cifar10 --dims 4,8,12,16,32,64,128,256,512
"""

import argparse
import os
import time

import torch

from mrl import UserError, cli
from mrl.checkpoint import MODEL_FILE, TrainState, checkpoint_run_dir, is_checkpoint, load_model, read_config
from mrl.data import load_splits, split_record, trained_rows
from mrl.distributed import make_accelerator
from mrl.eval_report import log_results, results_markdown, write_outputs
from mrl.features import features_cache_key, file_digest, load_or_extract, pca
from mrl.model_card import update_card_with_evaluation
from mrl.models import default_dims
from mrl.probe import L2_GRID, cascade, sklearn_probe, torch_probe
from mrl.retrieval import adaptive_retrieval, neighbor_metrics
from mrl.tracking import default_run_name, init_tracking
from mrl.transforms import ImageTransform, build_transform


def get_args_parser():
    parser = argparse.ArgumentParser("evaluate.py", description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="trained model folders (config.json + model.safetensors), or training checkpoints of a "
                             "run (<run>/checkpoints/step_N, e.g. of a run still training or stopped); several go in "
                             "one table/plot")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one name per checkpoint for tables and plots (default: the folder names)")
    cli.add_data_args(parser, default_dataset=None)
    parser.set_defaults(val_fraction=None, test_fraction=None)
    for action in parser._actions:  # the data flags default to what the (first) checkpoint trained with
        if action.dest in ("dataset", "dataset_path", "image_size", "val_fraction", "test_fraction", "min_image_size"):
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
    cli.add_wandb_args(group, "eval_<first run's label> and the start time")
    group.add_argument("--seed", type=int, default=0, help="seed of the validation split the probe carves from train "
                       "when the dataset has no test split (the validation split is then the evaluation set)")
    return parser


def main(args):
    check_args(args)
    accelerator = make_accelerator(log_with="wandb" if args.report_to == "wandb" else None)
    # the W&B run starts now, so that the console output below is on its page too
    init_tracking(accelerator, args, TrainState(), vars(args), job_type="eval")
    log = accelerator.print
    models = [load_run(path, accelerator.device) for path in args.checkpoint]
    labels = args.labels
    dims = [resolve_dims(args, path, config, heads) for path, (_, heads, config) in zip(args.checkpoint, models)]

    # ---- data: the splits the (first) run trained with, unless the flags override them; and never an image that
    # any of the runs trained on
    records = [split_record(config) for _, _, config in models]
    data = resolve_data(args, records)
    with accelerator.main_process_first():
        splits = load_splits(data["dataset"], data["dataset_path"], seed=data["seed"],
                             val_fraction=data["val_fraction"], test_fraction=data["test_fraction"],
                             max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                             min_image_size=data["min_image_size"])
        data["excluded_trained_images"] = exclude_trained_images(splits, records, labels, log)
    eval_split = eval_split_name(splits)
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
                                "embed_dim": config["model"]["embed_dim"],
                                "image_size": args.image_size or config["data"]["image_size"],
                                "wandb": config.get("wandb"), **run})
        embeddings[label] = features[eval_split]

    # ---- report: results.json, results.md and plots in --output_dir, the W&B page, the model cards
    if accelerator.is_main_process:
        images = write_outputs(args, results, embeddings)
        if args.report_to == "wandb":  # the W&B run started with the script; now its tables, charts and plots
            log_results(args, accelerator, results, images)
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
    labels = args.labels or [run_label(p) for p in args.checkpoint]
    if len(set(labels)) < len(labels):
        raise UserError(f"the runs need distinct names, got {labels}: pass --labels")
    args.labels = labels
    cli.resolve_report_to(args)
    first = args.checkpoint[0]
    # a training checkpoint's folder is deleted when newer ones replace it: its results go next to it, in the run
    default = (os.path.join(checkpoint_run_dir(first), f"eval_{os.path.basename(os.path.normpath(first))}")
               if is_checkpoint(first) else os.path.join(first, "eval"))
    args.output_dir = args.output_dir or default
    args.run_name = args.run_name or default_run_name("eval_" + labels[0])


def run_label(path):
    """A run's name in tables and plots: its folder's, or run@step_N for a training checkpoint."""
    name = os.path.basename(os.path.normpath(path))
    return f"{os.path.basename(checkpoint_run_dir(path))}@{name}" if is_checkpoint(path) else name


def load_run(path, device):
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint {path} does not exist (expected a folder written by a training script)")
    # a finished run, or one of its checkpoints (checkpoints/step_N) read with the run's config.json
    read_config(path)  # a clear error for a folder that is not a run, or from another format version
    backbone, heads, config = load_model(path)  # on the CPU: safetensors cannot load to a device like "cpu:1"
    return backbone.to(device), heads, config


def resolve_data(args, records):
    """The splits to evaluate on: the flags where given, otherwise the first run's own split record (its dataset,
    seed, fractions and minimum image size; the sample caps are evaluate.py's own flags)."""
    first = records[0]
    if args.dataset is None:
        others = {r["dataset"] for r in records} - {first["dataset"]}
        if others:
            raise UserError(f"the checkpoints were trained on different datasets ({first['dataset']}, "
                            f"{', '.join(sorted(others))}); pass --dataset to evaluate them all on one")
    dataset = args.dataset or first["dataset"]
    same = dataset == first["dataset"]
    flag_or_record = lambda name, default: (getattr(args, name) if getattr(args, name) is not None  # noqa: E731
                                            else first.get(name, default) if same else default)
    return {"dataset": dataset, "dataset_path": args.dataset_path or (first.get("dataset_path") if same else None),
            "seed": first.get("seed", 0), "val_fraction": flag_or_record("val_fraction", 0.1),
            "test_fraction": flag_or_record("test_fraction", 0.1), "min_image_size": flag_or_record("min_image_size", None)}


def eval_split_name(splits):
    return "test" if splits.test is not None else "val"


def exclude_trained_images(splits, records, labels, log):
    """Drop from the evaluation split every image that one of the runs trained on; returns how many were dropped.

    Only a split carved out of the source's train split can hold such images (a source's own test split, CIFAR's,
    cannot). A run whose split settings are those of the evaluation trained on a subset of its train split, which is
    disjoint from the evaluation split by construction; any other run on the same source (another --seed, other
    fractions or a different --min_image_size) has its training split rebuilt from its record and checked against
    the record's digest, and its images are removed. When none are left, the run list cannot be compared on this
    source: one line says which settings differ.
    """
    eval_split = eval_split_name(splits)
    here = splits.record
    if here["origin"][eval_split] != "train":
        return 0
    defining = ("seed", "val_fraction", "test_fraction", "min_image_size")
    trained = {}
    for label, record in zip(labels, records):
        rows = (record.get("source") or {}).get("train", {}).get("rows")
        if record["dataset"] != here["dataset"] or rows not in (None, here["source"]["train"]["rows"]):
            continue  # another source: its training images are not among these
        if all(record.get(key) == here[key] for key in defining):
            continue
        trained[label] = trained_rows({**record, "dataset_path": here["dataset_path"]})  # this copy of the source
    if not trained:
        return 0
    dataset = getattr(splits, eval_split)
    keep = [i for i, index in enumerate(dataset["index"]) if not any(index in rows for rows in trained.values())]
    differs = "; ".join(f"--{key}: " + ", ".join(f"{label} {record.get(key)}" for label, record in zip(labels, records))
                        for key in defining if len({str(r.get(key)) for r in records} | {str(here[key])}) > 1)
    if not keep:
        raise UserError(f"every {eval_split} image was trained on by one of the runs ({differs}): evaluate them "
                        "separately, or on a dataset with a test split of its own")
    log(f"the runs' splits differ ({differs}): evaluating on the {len(keep)} of {len(dataset)} {eval_split} images "
        f"that none of them trained on")
    setattr(splits, eval_split, dataset.select(keep))
    return len(dataset) - len(keep)


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
        cache_file = (os.path.join(cache_dir, f"{name}-{features_cache_key(digest, name, dataset, preprocessing)}.pt")
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


if __name__ == "__main__":
    cli.run(main, get_args_parser().parse_args())
