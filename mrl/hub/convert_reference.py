"""The MRL paper's released ImageNet-1k ResNet-50 checkpoints (RAIVNLab/MRL) as run folders of this repo.

    python -m mrl.hub.convert_reference final_weights.pt runs/reference_mrl_rn50
    python evaluate.py --checkpoint runs/reference_mrl_rn50 --dataset_path /data/imagenet

The reference saves `model.state_dict()` of a DDP-wrapped torchvision ResNet-50 with `torch.save`: every key starts
with `module.`, and the strided convs trained with BlurPool hold `<name>.conv.weight` and a `<name>.blur_filter`
buffer. Its `fc` is one of
  MRL      MRL_Linear_Layer: `fc.nesting_classifier_{i}`, a Linear(d_i, 1000) per nesting dim d_i (8 ... 2048);
  MRL-E    one Linear(2048, 1000) whose first d columns serve dim d: `fc.nesting_classifier_0` (MRL_Linear_Layer with
           efficient=True), or `fc.weight` in the layout of the released files (their SingleHeadNestedLinear);
  FF-K     FixedFeatureLayer: `fc.weight` of shape (1000, K), reading the first K of the 2048 features;
  baseline torchvision's own fc, Linear(2048, 1000) (FF-2048).
The released MRL-E and the baseline therefore store the same keys and shapes: `--variant auto` refuses to guess
between them. The output is what train_supervised.py writes (config.json + model.safetensors, mrl/run_folder/config.py),
with the reference's evaluation preprocessing (Resize 256 -> CenterCrop 224, ImageNet mean and std) and the 1,000
ILSVRC synsets as class names, so evaluate.py, embed.py and MatryoshkaEncoder.from_pretrained / push_to_hub read it
like any run.
"""

import hashlib
import os

import torch
from safetensors.torch import save_file

from mrl import UserError
from mrl.data.imagenet import synsets
from mrl.data.presets import IMAGENET_STATS, get_preset
from mrl.hub.model_card import write_card
from mrl.matryoshka import MatryoshkaHeads, default_dims
from mrl.models.backbones import ResNet, blur_filter
from mrl.run_folder.config import write_config
from mrl.run_folder.final_model import without_wrapper_prefixes
from mrl.run_folder.layout import CONFIG_FILE, MODEL_FILE
from mrl.utils import script

VARIANTS = ("auto", "mrl", "mrl-e", "ff", "baseline")
REPOSITORY = "RAIVNLab/MRL"
EMBED_DIM, NUM_CLASSES = 2048, 1000
# The reference's evaluation: Resize(256) -> CenterCrop(224), which is resized_crop_flip's eval transform at 224.
IMAGE_SIZE, AUGMENT = 224, "resized_crop_flip"
NESTED = "nesting_classifier_"


def get_args_parser():
    parser = script.ArgumentParser("python -m mrl.hub.convert_reference", description=__doc__)
    parser.add_argument("checkpoint", help="a .pt file saved by RAIVNLab/MRL's train_imagenet.py (a state dict)")
    parser.add_argument("output_dir", help="the run folder to write (config.json, model.safetensors, README.md); "
                                           "must not hold a model yet")
    parser.add_argument("--variant", choices=VARIANTS, default="auto",
                        help="which head the checkpoint has; auto reads it from the keys and shapes, except for a "
                             "2048-wide `fc.weight`, which the released MRL-E and the baseline share")
    return parser


def main(args):
    config = convert(args.checkpoint, args.output_dir, args.variant)
    heads = config["heads"]
    print(f"{args.checkpoint}: {config['converted_from']['variant']} ResNet-50"
          f"{' with BlurPool' if config['model']['blurpool'] else ''}, heads at dims {heads['dims']} -> "
          f"{args.output_dir}")


def convert(checkpoint, output_dir, variant="auto"):
    """Write the run folder for a reference checkpoint; returns its config.json contents."""
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    taken = [f for f in (MODEL_FILE, CONFIG_FILE) if os.path.exists(os.path.join(output_dir, f))]
    if taken:
        raise UserError(f"{output_dir} already holds a model ({', '.join(taken)}): choose another folder")
    state = read_reference(checkpoint)
    fc = {k.removeprefix("fc."): v for k, v in state.items() if k.startswith("fc.")}
    backbone, backbone_weights = load_backbone({k: v for k, v in state.items() if not k.startswith("fc.")}, checkpoint)
    variant, heads = load_heads(fc, variant, checkpoint)
    weights = {**{f"backbone.{k}": v for k, v in backbone_weights.items()},
               **{f"heads.{k}": v for k, v in heads.state_dict().items()}}
    config = reference_config(backbone, heads)
    config["converted_from"] = {"repository": REPOSITORY, "file": os.path.basename(checkpoint), "variant": variant,
                                "sha256": sha256(checkpoint)}
    os.makedirs(output_dir, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, os.path.join(output_dir, MODEL_FILE),
              metadata={"format": "pt"})
    write_config(output_dir, config)
    card = write_card(output_dir)
    with open(card, "a") as f:
        f.write(f"\n## Origin\n\nConverted from {REPOSITORY}'s released checkpoint `{os.path.basename(checkpoint)}` "
                f"({variant}) by `python -m mrl.hub.convert_reference`; the weights are theirs, unchanged.\n")
    return config


def read_reference(path):
    """The checkpoint's state dict, without DDP's `module.` prefix."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:  # weights_only: a state dict needs no code to unpickle, and a foreign file cannot run any
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zipfile and torch raise many types for files that are not checkpoints
        raise UserError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:120]})") from None
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"state_dict": ...} or {"model": ...}: a re-saved copy
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors, as {REPOSITORY}'s train_imagenet.py saves")
    return without_wrapper_prefixes(state)


def load_backbone(state, path):
    """(our ResNet-50 on the meta device, with BlurPool when the checkpoint was trained with it; the checkpoint's
    backbone weights under its keys). Checking the weights needs the architecture's keys and shapes only: on the
    meta device the model costs no memory and no initialization."""
    blurpool = any(k.endswith(".blur_filter") for k in state)
    with torch.device("meta"):
        backbone = ResNet("resnet50", blurpool=blurpool)
    ours = {k.removeprefix("net."): v for k, v in backbone.state_dict().items()}  # ResNet keeps torchvision's in .net
    # their blur filters are a saved buffer, ours a constant: on the convs we wrap too, theirs must be that constant
    # (any other filter is reported as unexpected below)
    filters = {k: k.replace(".blur_filter", ".conv.weight") for k in state if k.endswith(".blur_filter")}
    filters = {k: conv for k, conv in filters.items() if conv in ours}
    for key, conv in filters.items():
        expected = blur_filter(ours[conv].shape[1])
        if state[key].shape != expected.shape or not torch.allclose(state[key].float(), expected):
            raise UserError(f"{path}: {key} is not the [1, 2, 1] x [1, 2, 1] / 16 blur that BlurPool uses here")
    weights = {k: v for k, v in state.items() if k not in filters}
    shared = ours.keys() & weights.keys()
    problems = {"missing": sorted(ours.keys() - weights.keys()), "unexpected": sorted(weights.keys() - ours.keys()),
                "of another shape": sorted(k for k in shared if ours[k].shape != weights[k].shape)}
    if any(problems.values()):
        raise UserError(f"{path} is not a torchvision ResNet-50 as {REPOSITORY} trains it: "
                        + "; ".join(f"{len(keys)} weights {what} ({', '.join(keys[:3])}{', ...' * (len(keys) > 3)})"
                                    for what, keys in problems.items() if keys))
    return backbone, {f"net.{k}": v for k, v in weights.items()}


def load_heads(fc, variant, path):
    """(variant, MatryoshkaHeads with the checkpoint's fc weights). A reference Linear without bias gets a zero bias,
    which computes the same logits."""
    nested = sorted(k for k in fc if k.startswith(NESTED))
    found = "nested" if nested else "single" if set(fc) <= {"weight", "bias"} and "weight" in fc else None
    if found is None:
        keys = ", ".join(f"fc.{k}" for k in sorted(fc)[:4]) or "no fc.* keys"
        raise UserError(f"{path}: unknown classifier layout ({keys}); expected {REPOSITORY}'s fc.{NESTED}<i>.* "
                        "(MRL, MRL-E) or fc.weight (FF-K, the baseline, the released MRL-E)")
    linears = nested_linears(fc, path) if found == "nested" else [(fc["weight"], fc.get("bias"))]
    for weight, _ in linears:
        if weight.dim() != 2 or weight.shape[0] != NUM_CLASSES or not 1 <= weight.shape[1] <= EMBED_DIM:
            raise UserError(f"{path}: a classifier of shape {tuple(weight.shape)}; the reference's ImageNet-1k heads "
                            f"are ({NUM_CLASSES}, d) with d in 1..{EMBED_DIM}")
    widths = [w.shape[1] for w, _ in linears]
    full_single = len(linears) == 1 and widths[0] == EMBED_DIM
    if variant == "auto":
        if found == "single" and full_single:
            raise UserError(f"{path} has one 2048-wide fc.weight, which is either the baseline or an MRL-E checkpoint "
                            "in the released layout (the same keys and shapes): pass --variant baseline or "
                            "--variant mrl-e")
        variant = "ff" if found == "single" else "mrl-e" if full_single else "mrl"
    fits = {"mrl": found == "nested" and not full_single, "mrl-e": full_single, "ff": found == "single",
            "baseline": found == "single" and full_single}[variant]
    if not fits:
        raise UserError(f"{path} does not hold a {variant} head: its fc is "
                        + (f"{len(linears)} nested classifier(s) of widths {widths}" if found == "nested"
                           else f"one Linear reading the first {widths[0]} features"))
    weight, bias = linears[0]
    if variant == "mrl-e":  # the reference's nesting list; its keys do not record it
        heads = MatryoshkaHeads(default_dims(EMBED_DIM), NUM_CLASSES, tied=True)
        heads.classifier.load_state_dict({"weight": weight, "bias": with_bias(weight, bias)})
        return variant, heads
    if widths != sorted(set(widths)):
        raise UserError(f"{path}: nested classifiers of widths {widths}, not increasing")
    heads = MatryoshkaHeads(widths, NUM_CLASSES)
    for head, (weight, bias) in zip(heads.classifiers, linears):
        head.load_state_dict({"weight": weight, "bias": with_bias(weight, bias)})
    return variant, heads


def nested_linears(fc, path):
    """[(weight, bias or None)] of fc.nesting_classifier_0, 1, ... in order."""
    count = len({k.split(".")[0] for k in fc})
    linears = [(fc.get(f"{NESTED}{i}.weight"), fc.get(f"{NESTED}{i}.bias")) for i in range(count)]
    expected = {f"{NESTED}{i}.{p}" for i in range(count) for p in ("weight", "bias")}
    if any(w is None for w, _ in linears) or not set(fc) <= expected:
        raise UserError(f"{path}: the nested classifiers are not fc.{NESTED}0 ... {count - 1} "
                        f"(found {', '.join(sorted(fc)[:4])}, ...)")
    return linears


def with_bias(weight, bias):
    return bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)


def reference_config(backbone, heads):
    """config.json for a converted checkpoint: the reference's architecture, heads and evaluation preprocessing. Its
    split record names ImageNet-1k's own train and validation splits (nothing carved out of train), which is what the
    reference trained and evaluated on; seed and fractions are our defaults."""
    mean, std = IMAGENET_STATS
    splits = {"dataset": "imagenet", "dataset_path": None, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.0,
              "min_image_size": get_preset("imagenet").min_image_size, "max_train_samples": None,
              "max_eval_samples": None}
    return {"kind": "supervised",
            "model": {"backbone": "resnet50", "embed_dim": backbone.embed_dim, "cifar_stem": backbone.cifar_stem,
                      "norm": "batch", "blurpool": backbone.blurpool},
            "heads": {"dims": heads.dims, "num_classes": heads.num_classes, "tied": heads.tied,
                      "baseline": heads.dims == [EMBED_DIM] and not heads.tied,  # FF-2048 is the baseline
                      "class_names": list(synsets())},
            "data": {"dataset": "imagenet", "dataset_path": None, "image_size": IMAGE_SIZE, "mean": list(mean),
                     "std": list(std), "augment": AUGMENT, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.0,
                     "splits": splits}}


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    script.run(main, get_args_parser().parse_args())
