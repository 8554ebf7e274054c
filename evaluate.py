#!/usr/bin/env python
"""How good is each prefix z[:, :d] of a trained embedding? Accuracy against dimension, for one or more runs.

For every checkpoint (a folder written by train_supervised.py or train_ssl.py) and every d in --dims:
  probe top-1    offline linear probe on frozen, standardized features (mrl/eval/probe.py; --probe sklearn: the seed's)
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
(mrl/eval/results.py).

examples:
  python evaluate.py --checkpoint runs/supervised_mrl_digits_resnet18
  python evaluate.py --checkpoint runs/supervised_{mrl,baseline,mrl-e}_cifar10_resnet18 --labels MRL baseline MRL-E \\
    --output_dir runs/cmp
  accelerate launch --multi_gpu evaluate.py --checkpoint runs/ssl_relic_cifar10_resnet18 --dataset cifar10 \\
      --dataset_path ../shared/data/cifar10 --dims 4,8,12,16,32,64,128,256,512
"""

import argparse
import os
import time

from mrl import UserError, cli
from mrl.data.shards import is_webdataset
from mrl.data.sources import load_splits, trained_rows
from mrl.data.splits import split_record
from mrl.eval.features import PCA_FIT_SAMPLES
from mrl.eval.probe import L2_GRID, PROBE_MAX_TRAIN_SAMPLES
from mrl.eval.protocols import (
    STARTING_POINT,
    add_starting_points,
    embed_robustness_sets,
    embed_splits,
    evaluate_run,
    load_run,
    protocols,
    run_label,
)
from mrl.eval.quantized import PRECISIONS
from mrl.eval.results import (
    comparison,
    log_results,
    results_markdown,
    run_family,
    safe_name,
    wants_comparison,
    write_outputs,
)
from mrl.eval.retrieval_grid import default_grid_dims, evaluation_grid, split_thumbnails
from mrl.eval.robustness import SHIFTED_SETS, heads_top1, load_shifted, parse_paths
from mrl.hub.model_card import update_card_with_evaluation
from mrl.matryoshka import default_dims, evaluation_dims, parse_dims
from mrl.report.tracking import default_run_name, init_tracking, resolve_report_to
from mrl.run_folder.layout import checkpoint_run_dir, is_checkpoint
from mrl.train.checkpoint import TrainState
from mrl.utils import script
from mrl.utils.distributed import make_accelerator


def get_args_parser():
    parser = script.ArgumentParser("evaluate.py", description=__doc__)
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
    group.add_argument("--dims", type=parse_dims, nargs="+", default=None,
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
    group.add_argument("--adaptive_retrieval", action=argparse.BooleanOptionalAction, default=True,
                       help="adaptive retrieval (shortlist with a small prefix, re-rank at full dim, timed) and its "
                            "quantized shortlists (--index_precisions); --no-adaptive_retrieval skips both")
    group.add_argument("--index_precisions", nargs="*", default=list(PRECISIONS), choices=PRECISIONS,
                       help="adaptive retrieval with each shortlist dim's index stored at these precisions (float32, "
                            "int8: 1 byte a dim, binary: 1 bit), re-ranked in float32 at full dim: recall@k of the "
                            "full-dim float32 search against bytes per image (quantized_retrieval.png); none: skip")
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
    log = accelerator.print
    # ---- the runs, checked and loaded before anything is written (the W&B run, --output_dir)
    models = [load_run(path, accelerator.device) for path in args.checkpoint]
    if args.before_finetuning:  # each fine-tuned run's pretrained start, evaluated next to it
        add_starting_points(args, models, accelerator.device, accelerator.print)
    labels = args.labels
    dims = [resolve_dims(args, path, config, heads) for path, (_, heads, config) in zip(args.checkpoint, models)]
    records = [split_record(config) for _, _, config in models]
    data = resolve_data(args, records)
    init_tracking(accelerator, args, TrainState(), vars(args), job_type="eval")

    # ---- data: the splits the (first) run trained with, unless the flags override them; and never an image that
    # any of the runs trained on
    for name in ("max_train_samples", "max_eval_samples"):
        if data[name] and getattr(args, name) is None:
            log(f"{labels[0]} trained with --{name} {data[name]}: evaluating on the same "
                f"{'training subset' if name == 'max_train_samples' else 'capped evaluation splits'} "
                f"(--{name} 0 evaluates on all, another number on that many)")
    with accelerator.main_process_first():
        splits = load_splits(data["dataset"], data["dataset_path"], seed=data["seed"],
                             val_fraction=data["val_fraction"], test_fraction=data["test_fraction"],
                             max_train_samples=data["max_train_samples"], max_eval_samples=data["max_eval_samples"],
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
    resolve_report_to(args)
    first = args.checkpoint[0]
    # a training checkpoint's folder is deleted when newer ones replace it: its results go next to it, in the run
    default = (os.path.join(checkpoint_run_dir(first), f"eval_{os.path.basename(os.path.normpath(first))}")
               if is_checkpoint(first) else os.path.join(first, "eval"))
    args.output_dir = args.output_dir or default
    args.robustness_path = parse_paths(args.robustness_path)
    args.robustness = list(dict.fromkeys([*args.robustness, *args.robustness_path]))  # in order, once each
    args.run_name = args.run_name or default_run_name("eval_" + labels[0])


def resolve_data(args, records):
    """The splits to evaluate on: the flags where given, otherwise the first run's own split record (its dataset,
    seed, fractions, minimum image size and sample caps)."""
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
            "test_fraction": flag_or_record("test_fraction", 0.1), "min_image_size": flag_or_record("min_image_size", None),
            # the run's subsets too: a run trained on 256 images is probed on those, not on the whole split
            "max_train_samples": flag_or_record("max_train_samples", None),
            "max_eval_samples": flag_or_record("max_eval_samples", None)}


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
    """The dims to evaluate a run at: --dims, or the defaults and every head's dim."""
    embed_dim = config["model"]["embed_dim"]
    default = default_dims(embed_dim) + (heads.dims if heads is not None else [])
    return evaluation_dims(args.dims, embed_dim, default, whose=f"the embedding dim of {path}")


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


if __name__ == "__main__":
    script.run(main, get_args_parser().parse_args())
