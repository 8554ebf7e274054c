"""The runs evaluate.py measures: each loaded from its folder or checkpoint (load_run, and a fine-tuned run's
pretrained start beside it: add_starting_points), named (run_label), and embedded -- every split and robustness set,
from the feature cache or the model (embed_splits), the cache keyed by the weights (weights_digest)."""

import os

from mrl import UserError
from mrl.batches.transforms import ImageTransform, eval_transform
from mrl.eval.features import features_cache_key, file_digest, load_or_extract, state_digest
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
