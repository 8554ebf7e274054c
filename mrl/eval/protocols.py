"""What evaluate.py does per run, every number with what produced it. First the runs: each loaded from its folder or
checkpoint (load_run, and a fine-tuned run's pretrained start beside it: add_starting_points), named (run_label), and
embedded -- every split and robustness set, from the feature cache or the model (embed_splits), the cache keyed by
the weights (weights_digest). Then the protocols on one run's features (evaluate_run): the linear probe and kNN /
retrieval on each prefix, the PCA baseline, each head's own prediction, and the adaptive curves (classification that
cascades over dims, retrieval that shortlists with a small prefix and re-ranks, also from quantized indexes)."""

import os
import time

import torch

from mrl import UserError
from mrl.batches.transforms import ImageTransform, eval_transform
from mrl.eval.features import features_cache_key, file_digest, load_or_extract, pca, state_digest
from mrl.eval.probe import cascade, sklearn_probe, torch_probe
from mrl.eval.quantized import quantized_retrieval
from mrl.eval.retrieval import adaptive_retrieval, neighbor_metrics
from mrl.models.backbones import build_backbone
from mrl.run_folder.config import read_config
from mrl.run_folder.final_model import load_model
from mrl.run_folder.layout import FEATURES_DIR, MODEL_FILE, checkpoint_run_dir, is_checkpoint

STARTING_POINT = "pretrained start"  # the config kind of a fine-tuned run's pretrained backbone (--before_finetuning)


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


def eval_preprocessing(args, accelerator, config):
    """The run's evaluation preprocessing (e.g. Resize 256 -> CenterCrop 224 for ImageNet, a pretrained backbone's
    own), as MatryoshkaEncoder preprocesses, and its description for the feature cache's key."""
    transform = eval_transform(config, args.image_size)
    return transform, {"transform": repr(transform), "mixed_precision": accelerator.mixed_precision}


def feature_cache_dir(args, path):
    cache_dir = args.feature_cache or os.path.join(path, FEATURES_DIR)
    return None if cache_dir.lower() == "none" else cache_dir


def embed_robustness_sets(args, accelerator, path, label, backbone, config, shifted):
    """{set name: (features, labels)} of the robustness sets, cached like the splits (<name>-<key>.pt)."""
    if not shifted:
        return {}
    transform, preprocessing = eval_preprocessing(args, accelerator, config)
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
    transform, preprocessing = eval_preprocessing(args, accelerator, config)
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


# ---- the protocols

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
        rows[p.dim].update(probe=p.accuracy, probe_top5=topk_accuracy(p.probs, eval_y, 5), probe_l2=p.l2)
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
    funnel, quantized = [], []
    if args.adaptive_retrieval:
        funnel = timed("adaptive_retrieval", "adaptive retrieval", lambda: adaptive_retrieval(
            train_x, train_y, eval_x, eval_y, dims, eval_x.shape[1], args.shortlist, k, device=device,
            index=args.index))
    if args.adaptive_retrieval and args.index_precisions:
        quantized = timed("quantized_retrieval", "quantized shortlists", lambda: quantized_retrieval(
            train_x, train_y, eval_x, eval_y, dims, eval_x.shape[1], args.index_precisions, args.shortlist, k))
    return {"dims": dims, "per_dim": [rows[d] for d in sorted(rows)], "adaptive_classification": adaptive,
            "adaptive_retrieval": funnel, "quantized_retrieval": quantized, "seconds": timings,
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
        "quantized_retrieval": f"the same funnel with the shortlist's index over the d_s prefix stored at "
                               f"{', '.join(args.index_precisions)} precision (faiss, exact: float32 inner product; int8 "
                               "scalar quantizer calibrated on the train embeddings; binary sign bits by Hamming "
                               f"distance), shortlist {args.shortlist}, re-ranked in float32 at full dim; recall@{k}: "
                               f"the share of the full-dim float32 search's top-{k} it returns; bytes per image: the "
                               "index's codes",
    }
    if args.robustness:
        described["robustness"] = ("each head's own top-1 on distribution-shifted ImageNet test sets, with the run's "
                                   "evaluation preprocessing; on ImageNet-A and -R (200 classes) the argmax runs over "
                                   "those 200 classes' logits only")
    if not args.adaptive_retrieval:
        described.pop("adaptive_retrieval")
    if not (args.adaptive_retrieval and args.index_precisions):
        described.pop("quantized_retrieval")
    return {name: text for name, text in described.items() if name != "pca" or args.pca}
