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
embedding its shard, and streamed into <checkpoint>/features (float16, read back memory-mapped), so a second
evaluation starts from the cache. The splits are those the run trained with (its config's dataset, seed and
fractions), unless flags say otherwise.
Results go to --output_dir: results.json, results.md, PNG plots, and with --report_to wandb a W&B run
(mrl/eval_report.py).

examples:
  python evaluate.py --checkpoint runs/supervised_mrl_digits_resnet18
  python evaluate.py --checkpoint runs/mrl runs/baseline runs/mrl_e --labels MRL baseline MRL-E --output_dir runs/cmp
  accelerate launch --multi_gpu evaluate.py --checkpoint runs/relic_r18 --dataset cifar10 \\
      --dataset_path ../shared/data/cifar10 --dims 4,8,12,16,32,64,128,256,512
"""

import argparse
import json
import os
import time

import torch

from mrl import UserError, cli
from mrl.checkpoint import MODEL_FILE, TrainState, checkpoint_run_dir, is_checkpoint, load_model, read_config
from mrl.data import load_splits, split_record, trained_rows
from mrl.distributed import make_accelerator
from mrl.eval_report import (comparison, log_results, results_markdown, run_family, safe_name, wants_comparison,
                             write_outputs)
from mrl.features import PCA_FIT_SAMPLES, features_cache_key, file_digest, load_or_extract, pca, state_digest
from mrl.model_card import update_card_with_evaluation
from mrl.models import build_backbone, default_dims
from mrl.pretrained import eval_transform as run_eval_transform
from mrl.probe import L2_GRID, PROBE_MAX_TRAIN_SAMPLES, cascade, sklearn_probe, torch_probe
from mrl.retrieval import adaptive_retrieval, neighbor_metrics
from mrl.retrieval_grid import default_grid_dims, evaluation_grid, split_thumbnails
from mrl.robustness import SHIFTED_SETS, heads_top1, load_shifted, parse_paths
from mrl.streams import is_webdataset
from mrl.tracking import default_run_name, init_tracking
from mrl.transforms import ImageTransform

STARTING_POINT = "pretrained start"  # the config kind of a fine-tuned run's pretrained backbone (--before_finetuning)


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
    group.add_argument("--probe_max_train_samples", type=int, default=PROBE_MAX_TRAIN_SAMPLES,
                       help="both probes are fitted full-batch on a stratified random subset (per-class shares as in "
                            "train, drawn with --seed) of at most this many train images, and results.json states "
                            "how many; 0: all. The default keeps CIFAR-10 whole and fits ImageNet-1k (1.28M x "
                            "2,048) in ~4 GB of device memory (~78 images per class); all 1.28M would need a "
                            "mini-batch probe, which this is not")
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
    group.add_argument("--pca_fit_samples", type=int, default=PCA_FIT_SAMPLES,
                       help="the PCA baseline's mean and axes are fitted on this many train images drawn at random "
                            "(with --seed; 0: all), then every split is projected in chunks")
    group.add_argument("--before_finetuning", action="store_true",
                       help="runs fine-tuned from a pretrained backbone (--pretrained): also evaluate that backbone "
                            "as it was before fine-tuning -- its pooled feature cut to each d, and PCA to d -- in the "
                            "same table, next to the run: what MRL buys over truncating the pretrained embedding. Its "
                            "weights are read again from where the run got them (the folder, the Hub's cache, "
                            "torchvision's cache)")
    group.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                       help="the MRL paper's Figure 2 (comparison.png and a table): top-1 / top-5 against dim of "
                            "MRL's heads, MRL-E's heads, the fixed-feature FF-K runs (one point per run, at d=K) and "
                            "the baseline's PCA to d with the probe. Default: on when the checkpoints include an FF-K "
                            "run or runs of more than one kind")
    group.add_argument("--retrieval_grid", action=argparse.BooleanOptionalAction, default=True,
                       help="draw, per run, a few evaluation images (one per class, evenly spaced) with their nearest "
                            "train images at the smallest, a middle and the full dim (retrieval_grid_<run>.png, on "
                            "W&B under plots/retrieval_grid)")
    group.add_argument("--robustness", nargs="+", default=[], choices=list(SHIFTED_SETS), metavar="SET",
                       help="supervised ImageNet runs: also each head's top-1 on these distribution-shift test sets "
                            f"({', '.join(SHIFTED_SETS)}), with the run's evaluation preprocessing; ImageNet-A and -R "
                            "cover 200 classes, and the heads' argmax is restricted to them (as their authors "
                            "evaluate). Read from the Hub unless --robustness_path gives a folder")
    group.add_argument("--robustness_path", nargs="+", default=[], metavar="SET=DIR",
                       help="a local copy of a robustness set, as distributed: DIR holds one subfolder per class, "
                            "named by WordNet id (n01440764) or, as ImageNetV2 ships, by class index (0..999); "
                            "a set given here is evaluated without naming it in --robustness")
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
    if args.before_finetuning:  # each fine-tuned run's pretrained start, evaluated next to it
        add_starting_points(args, models, accelerator.device, accelerator.print)
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
    families = [run_family(config) for _, _, config in models]
    compare = args.compare if args.compare is not None else wants_comparison(families)
    shifted = load_robustness_sets(args, models, accelerator)

    results = {"dataset": data, "eval_split": eval_split, "class_names": class_names, "protocols": protocols(args),
               "runs": []}
    embeddings = {}  # label -> the evaluation split's (features, labels), for the 2-D PCA scatter plots
    grids = {}  # label -> (train features, evaluation features, dims), for the retrieval grids
    for path, label, (backbone, heads, config), run_dims, (family, k) in zip(args.checkpoint, labels, models, dims,
                                                                             families):
        # ---- features of every split, from the cache or the model (eval-mode preprocessing on train too)
        start = time.perf_counter()
        features = embed_splits(args, accelerator, path, label, backbone, config, splits)
        shifted_features = embed_robustness_sets(args, accelerator, path, label, backbone, config, shifted)
        if not accelerator.is_main_process:
            continue  # the evaluation itself runs on the gathered features, in the main process
        log(f"{label}: features ready in {time.perf_counter() - start:.1f} s; evaluating dims {run_dims}")
        run = evaluate_run(args, features, eval_split, heads, run_dims, len(class_names), accelerator.device,
                           lambda line, label=label: log(f"{label}: {line}"))
        if shifted_features:
            run["robustness"] = {name: {"n": len(y), "top1": heads_top1(heads, x, y, name)}
                                 for name, (x, y) in shifted_features.items()}
        results["runs"].append({"label": label, "checkpoint": path, "kind": config.get("kind"), "family": family,
                                "fixed_feature": k, "embed_dim": config["model"]["embed_dim"],
                                "image_size": args.image_size or config["data"]["image_size"],
                                "wandb": config.get("wandb"), **run})
        embeddings[label] = features[eval_split]
        grids[label] = (features["train"], features[eval_split], run_dims)
    if shifted:
        results["robustness"] = {name: {"title": SHIFTED_SETS[name].title, "source": source, "n": len(ds),
                                        "restricted_to_classes": SHIFTED_SETS[name].classes_file is not None}
                                 for name, (ds, source, _) in shifted.items()}
    if compare and accelerator.is_main_process:
        results["comparison"] = comparison(args, results["runs"], log)
        results["protocols"]["comparison"] = (
            "the MRL paper's Figure 2: top-1 / top-5 of MRL's and MRL-E's heads at their dims, of each fixed-feature "
            "run's single head at its K (FF, one point per run), and of the probe on the baseline's embedding reduced "
            "to d by PCA")

    # ---- report: results.json, results.md and plots in --output_dir, the W&B page, the model cards
    if accelerator.is_main_process:
        images = write_outputs(args, results, embeddings)
        database, queries = split_thumbnails(splits.train), split_thumbnails(getattr(splits, eval_split))
        for label, (train, evaluation, run_dims) in grids.items() if args.retrieval_grid else []:
            images[f"retrieval_grid/{label}"] = evaluation_grid(
                os.path.join(args.output_dir, f"retrieval_grid_{safe_name(label)}.png"), *train, *evaluation,
                default_grid_dims(run_dims), database, queries, class_names, device=accelerator.device,
                title=f"{label}: nearest train images by cosine on each prefix")
            log(f"{label}: retrieval grid in {images[f'retrieval_grid/{label}']}")
        if args.report_to == "wandb":  # the W&B run started with the script; now its tables, charts and plots
            log_results(args, accelerator, results, images)
        for run in results["runs"] if args.update_model_card else []:
            if run["kind"] == STARTING_POINT:  # it shares its run's folder, and card, with the fine-tuned model
                continue
            own = {**results, "runs": [run], "comparison": None}  # a card holds its run's results, no comparison
            card = update_card_with_evaluation(run["checkpoint"], results_markdown(args, own),
                                               run["per_dim"], results["eval_split"], args.output_dir)
            log(f"updated the model card {card}")
    accelerator.end_training()


def check_args(args):
    for name in ("knn_k", "shortlist", "batch_size", "probe_max_iter"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    for name in ("probe_max_train_samples", "pca_fit_samples"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 (all) or a positive number of images")
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
    args.robustness_path = parse_paths(args.robustness_path)
    args.robustness = list(dict.fromkeys([*args.robustness, *args.robustness_path]))  # in order, once each
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


def add_starting_points(args, models, device, log):
    """After each fine-tuned run in args.checkpoint / args.labels / `models`, its pretrained start: the network as
    it was loaded before the first step, without the run's --embed_dim projection (its pooled feature), and without
    heads (evaluated by the probe, kNN and PCA like a self-supervised run)."""
    checkpoints, labels, loaded = [], [], []
    for path, label, model in zip(args.checkpoint, args.labels, models):
        checkpoints.append(path)
        labels.append(label)
        loaded.append(model)
        config = model[2]
        model_cfg = config["model"]
        if not model_cfg.get("pretrained"):
            continue
        log(f"{label}: loading its pretrained start, {model_cfg['backbone']}")
        start = build_backbone(model_cfg["backbone"], config["data"]["image_size"], model_cfg.get("cifar_stem"),
                               pretrained=True, timm=model_cfg.get("timm"))
        # its feature cache is keyed by the weights themselves: new weights saved into the source folder (or a
        # newer revision in the Hub's cache) are new features
        start_config = {**config, "kind": STARTING_POINT, "heads": None, "ssl": None,
                        "model": {**model_cfg, "embed_dim": start.embed_dim, "projection": None},
                        "weights_digest": state_digest(start)}
        checkpoints.append(path)
        labels.append(f"{label} (before fine-tuning)")
        loaded.append((start.to(device).eval(), None, start_config))
    if len(loaded) == len(models):
        raise UserError("--before_finetuning: none of the runs was fine-tuned from a pretrained backbone "
                        "(trained with --pretrained)")
    args.checkpoint, args.labels, models[:] = checkpoints, labels, loaded


def weights_digest(path, config):
    """What identifies a model's weights in its feature cache key: its file's digest, or for a pretrained start
    (which has no file) the digest of the weights it was built with."""
    if config.get("kind") == STARTING_POINT:
        return "pretrained:" + config["weights_digest"]
    return file_digest(os.path.join(path, MODEL_FILE))


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
    path = args.dataset_path or (first.get("dataset_path") if same else None)
    if path and is_webdataset(path):  # a run trained on shards: its validation split is read from a map-style copy
        raise UserError(f"{path} holds webdataset shards, which evaluate.py does not read (it indexes whole splits); "
                        "pass --dataset_path with an ILSVRC folder or a copy in the Hub's parquet layout")
    flag_or_record = lambda name, default: (getattr(args, name) if getattr(args, name) is not None  # noqa: E731
                                            else first.get(name, default) if same else default)
    return {"dataset": dataset, "dataset_path": path,
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


def load_robustness_sets(args, models, accelerator):
    """{name: (dataset, source, version)} of the --robustness sets; each needs heads over ImageNet-1k's classes."""
    if not args.robustness:
        return {}
    for path, (_, heads, _) in zip(args.checkpoint, models):
        if heads is None or heads.num_classes != 1000:
            raise UserError(f"--robustness evaluates the heads of supervised ImageNet-1k runs; {path} has "
                            f"{'no heads' if heads is None else f'heads over {heads.num_classes} classes'}")
    with accelerator.main_process_first():  # the main process downloads, the others read its cache
        sets = {name: load_shifted(name, args.robustness_path.get(name)) for name in args.robustness}
    for name, (ds, source, _) in sets.items():
        accelerator.print(f"{SHIFTED_SETS[name].title}: {len(ds)} images from {source}")
    return sets


def eval_transform(args, accelerator, config):
    """The run's evaluation preprocessing (e.g. Resize 256 -> CenterCrop 224 for ImageNet, a pretrained backbone's
    own), as MatryoshkaEncoder preprocesses, and its description for the feature cache's key."""
    transform = run_eval_transform(config, args.image_size)
    return transform, {"transform": repr(transform), "mixed_precision": accelerator.mixed_precision}


def feature_cache_dir(args, path):
    cache_dir = args.feature_cache or os.path.join(path, "features")
    return None if cache_dir.lower() == "none" else cache_dir


def embed_robustness_sets(args, accelerator, path, label, backbone, config, shifted):
    """{set name: (features, labels)} of the robustness sets, cached like the splits (<name>-<key>.pt)."""
    if not shifted:
        return {}
    transform, preprocessing = eval_transform(args, accelerator, config)
    digest = weights_digest(path, config)
    cache_dir = feature_cache_dir(args, path)
    features = {}
    for name, (dataset, _, version) in shifted.items():
        dataset.set_transform(ImageTransform(transform, decoder=args.decoder))
        key = features_cache_key(digest, name, dataset, {**preprocessing, "source_version": version})
        x, y, _ = load_or_extract(accelerator, backbone, dataset,
                                  os.path.join(cache_dir, f"{name}-{key}.pt") if cache_dir else None,
                                  args.batch_size, args.num_workers, log=accelerator.print,
                                  desc=f"{label}: {name} features")
        features[name] = (x, y)
    return features


def embed_splits(args, accelerator, path, label, backbone, config, splits):
    """{split: (features, labels)} for train, val and test, each loaded from the cache or extracted."""
    transform, preprocessing = eval_transform(args, accelerator, config)
    digest = weights_digest(path, config)
    cache_dir = feature_cache_dir(args, path)
    features = {}
    for name in ("train", "val", "test"):
        dataset = getattr(splits, name)
        if dataset is None:
            continue
        dataset.set_transform(ImageTransform(transform, decoder=args.decoder))
        cache_file = (os.path.join(cache_dir, f"{name}-{features_cache_key(digest, name, dataset, preprocessing)}.pt")
                      if cache_dir else None)
        x, y, _ = load_or_extract(accelerator, backbone, dataset, cache_file, args.batch_size, args.num_workers,
                                  log=accelerator.print, desc=f"{label}: {name} features")
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
            return sklearn_probe(x_train, train_y, x_eval, eval_y, dims, log=say,
                                 max_train_samples=args.probe_max_train_samples, seed=args.seed)
        return torch_probe(x_train, train_y, x_eval, eval_y, dims, num_classes, x_val, val_y, l2_grid=args.probe_l2,
                           max_iter=args.probe_max_iter, seed=args.seed, device=device, log=say,
                           max_train_samples=args.probe_max_train_samples)

    def neighbors(x_train, x_eval):
        return neighbor_metrics(x_train, train_y, x_eval, eval_y, dims, num_classes, args.knn_k,
                                args.knn_temperature, args.retrieval_k, device)

    def timed(name, title, work):  # one line per stage, as it ends
        start = time.perf_counter()
        result = work()
        timings[name] = time.perf_counter() - start
        log(f"{title} at {len(dims)} dims: {timings[name]:.1f} s")
        return result

    probes = timed("probe", "linear probe", lambda: probe(train_x, val_x, eval_x, "embedding"))
    for p in probes:
        rows[p.dim].update(probe=p.accuracy, probe_l2=p.l2)
    for r in timed("knn_retrieval", "kNN and retrieval", lambda: neighbors(train_x, eval_x)):
        rows[r["dim"]].update({k: v for k, v in r.items() if k != "dim"})

    if args.pca:
        def pca_baseline():
            pca_train, pca_eval, *pca_val = pca(train_x, eval_x, *([val_x] if val_x is not None else []),
                                                 fit_samples=args.pca_fit_samples, seed=args.seed, device=device)
            for p in probe(pca_train, pca_val[0] if pca_val else None, pca_eval, "PCA"):
                rows[p.dim].update(pca_probe=p.accuracy, pca_probe_top5=topk_accuracy(p.probs, eval_y, 5))
            for r in neighbors(pca_train, pca_eval):
                rows[r["dim"]].update({f"pca_{k}": v for k, v in r.items() if k != "dim"})

        timed("pca", "PCA baseline (fit, probe, kNN, retrieval)", pca_baseline)

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
        heads_result = {"dims": heads.dims, "top1": head_accuracy,
                        "top5": [topk_accuracy(logits, eval_y, 5) for logits in head_logits]}

    k = args.retrieval_k[0]
    funnel = timed("adaptive_retrieval", "adaptive retrieval", lambda: adaptive_retrieval(
        train_x, train_y, eval_x, eval_y, dims, eval_x.shape[1], args.shortlist, k, device=device, index=args.index))
    return {"dims": dims, "per_dim": [rows[d] for d in sorted(rows)], "adaptive_classification": adaptive,
            "adaptive_retrieval": funnel, "seconds": timings,
            "n": {"train": len(train_x), "val": len(features["val"][0]), "eval": len(eval_x),
                  "probe_train": probes[0].train_samples,
                  "pca_fit": min(len(train_x), args.pca_fit_samples or len(train_x))},
            **({"heads": heads_result} if heads is not None else {})}


def topk_accuracy(scores, labels, k):
    """Fraction of rows whose label is among their k highest scores (all of them when there are fewer classes)."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return (top == labels[:, None]).any(-1).float().mean().item()


def protocols(args):
    """What produced each number (written next to the results, so that no number is read without it)."""
    k = args.retrieval_k
    probe = ("offline linear probe on frozen features: multinomial logistic regression (torch, L-BFGS) on "
             f"standardized features, L2 in {args.probe_l2} picked by validation cross-entropy"
             if args.probe == "torch" else
             "offline linear probe, the seed's protocol: StandardScaler + CalibratedClassifierCV("
             "LogisticRegression(max_iter=100)), fitted on train")
    if args.probe_max_train_samples:
        probe += (f"; fitted on a stratified random subset of at most {args.probe_max_train_samples} train images "
                  "(n.probe_train: how many)")
    described = {
        "probe": probe,
        "knn": f"weighted kNN top-1 (k={args.knn_k}, T={args.knn_temperature}, cosine on the L2-renormalized prefix; "
               "bank: train split)",
        "retrieval": f"queries: evaluation split, database: train split, relevant = same label; precision@k and "
                     f"mAP@k for k in {k} (AP@k divided by min(k, relevant items); map_mrl@k divides by k as the "
                     "MRL paper's code does); top1 = 1-NN accuracy",
        "pca": "PCA of the full train embedding reduced to d, then the same probe / kNN / retrieval"
               + (f"; mean and axes fitted on at most {args.pca_fit_samples} random train images (n.pca_fit)"
                  if args.pca_fit_samples else ""),
        "head": "each Matryoshka head's own prediction (no probe; supervised runs only)",
        "adaptive_classification": "cascade from the smallest dim up, stop when the max softmax probability "
                                   "reaches the threshold; accuracy vs expected dims (heads, and the probes)",
        "adaptive_retrieval": f"shortlist {args.shortlist} by the d_s prefix, re-rank by the full embedding; "
                              f"wall-clock per query ({'faiss HNSW' if args.index == 'hnsw' else 'exact torch'} "
                              "search on this machine, median of 3 runs over up to 2000 queries) vs full-dim search "
                              "with the same kind of index",
    }
    if args.robustness:
        described["robustness"] = ("each head's own top-1 on distribution-shifted ImageNet test sets, with the run's "
                                   "evaluation preprocessing; on ImageNet-A and -R (200 classes) the argmax runs over "
                                   "those 200 classes' logits only")
    return {name: text for name, text in described.items() if name != "pca" or args.pca}


if __name__ == "__main__":
    cli.run(main, get_args_parser().parse_args())
