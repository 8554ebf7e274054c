"""config.json: what a run folder says about itself, written by one function for both training scripts (and the
benchmarks that export a model into a run folder).

It holds what evaluate.py, embed.py and MatryoshkaEncoder need to rebuild the backbone (and heads) and their
preprocessing without the training script: the architecture, the dims, the normalization, everything that defines
the data splits, and the flags. It also owns where the weights sit in a training checkpoint of an SSL run: the
SSLModel's `online.*` and `target.module.*` (mrl/ssl/model.py names its submodules after these).
"""

import json
import os

from mrl import UserError
from mrl.run_folder.layout import CONFIG_FILE, checkpoint_run_dir, is_checkpoint

FORMAT_VERSION = 1
ONLINE, TARGET = "online", "target.module"  # the SSL training model's encoders, as their state-dict keys start


def run_config(args, backbone, splits, mean, std, augment, heads=None, ssl=None, timm=None, preprocessing=None):
    """The contents of config.json (without its format version, which write_config adds, and the W&B run's
    coordinates, which mrl.train.run.start_tracking adds once the run has started).

    `heads`: a supervised run's {"dims", "num_classes", "tied", "baseline", "fixed_feature"} (the class names are
    added here);
    `ssl`: an SSL run's {"method", "nest", "dims", "exported", "projector"}. Exactly one of them is given.
    `timm`: a timm backbone's spec (architecture, model_args, source: what rebuilds it offline); `preprocessing`: a
    pretrained backbone's resize and crop (mrl.models.pretrained_backbones; None: the dataset preset's).
    """
    if (heads is None) == (ssl is None):
        raise ValueError("a run has either heads (supervised) or an ssl block")
    data = {"dataset": args.dataset, "dataset_path": args.dataset_path, "image_size": args.image_size,
            "mean": list(mean), "std": list(std), "augment": augment, "seed": args.seed,
            "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
            "splits": splits.record,  # everything that defines the splits: evaluate.py rebuilds them from it
            "preprocessing": preprocessing and {k: preprocessing[k] for k in ("image_size", "resize", "crop_mode",
                                                                              "interpolation")}}
    config = {"kind": "ssl" if ssl is not None else "supervised",
              "model": {"backbone": args.model, "embed_dim": backbone.embed_dim,
                        "cifar_stem": getattr(backbone, "cifar_stem", None), "norm": getattr(args, "norm", "batch"),
                        "blurpool": getattr(backbone, "blurpool", False),
                        # a pretrained start: where from, and what rebuilds a timm network without reaching the Hub
                        "pretrained": getattr(args, "pretrained", False), "timm": timm,
                        "projection": getattr(args, "embed_dim", None)},
              "heads": {**heads, "class_names": splits.class_names} if heads is not None else None}
    if ssl is not None:  # the labels the kNN monitor used live with the data
        config["ssl"], data["class_names"] = ssl, splits.class_names
    config.update(data=data, args=vars(args))
    return config


def write_config(output_dir, config):
    """config.json: written when training starts (so that the run's checkpoints can be evaluated while it runs or
    after it stopped) and again with the final model."""
    with open(os.path.join(output_dir, CONFIG_FILE), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **config}, f, indent=2)


def read_config(path):
    """The config.json of a finished run folder, or of the run a checkpoint folder belongs to."""
    folder = checkpoint_run_dir(path) if is_checkpoint(path) else path
    file = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(file):
        if is_checkpoint(path):
            raise UserError(f"{path} is a training checkpoint, but its run folder {folder} has no {CONFIG_FILE} (runs "
                            "of earlier versions wrote it only at the end): resume the run to finish it, then "
                            "evaluate the run folder")
        raise UserError(f"{path} is not a trained model folder: {CONFIG_FILE} is missing")
    with open(file) as f:
        config = json.load(f)
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{file} has format version {config.get('format_version')}; this code reads {FORMAT_VERSION}")
    return config


def weight_prefixes(config, checkpoint):
    """Where the backbone and heads sit in a weights file: `backbone.*` and `heads.*` in a finished run's
    model.safetensors; in a training checkpoint, the keys of the whole training model (for SSL runs the exported
    encoder: the EMA target's backbone or the online one)."""
    if not checkpoint or config.get("kind") != "ssl":
        return "backbone.", "heads."
    encoder = TARGET if (config.get("ssl") or {}).get("exported") == "target" else ONLINE
    return f"{encoder}.backbone.", None
