"""Backbones from elsewhere: any timm model (ResNets, ConvNeXt, ViT, DINOv2, CLIP image towers...) and torchvision's
ResNets with their ImageNet weights, as the embedding network of a Matryoshka run.

`--model` names where the network comes from:
  timm/<name>          a timm model by name (`timm/convnext_tiny.fb_in22k`); its weights are the Hub repo timm/<name>
  hf-hub:<user>/<repo> a timm model on the Hub (its config.json names the architecture)
  <folder>             a timm model saved in the Hub's layout (config.json + model.safetensors), e.g. by
                       `timm.models.push_to_hub` / `save_for_hf`, or a Hub repo downloaded with `hf download`
  resnet18/34/50       torchvision's ResNets; with --pretrained their ImageNet weights (DEFAULT)

The embedding is the network's pooled feature, where its classifier attaches (timm: `num_classes=0`; torchvision:
the input of `fc`); `--embed_dim D` puts a linear layer to D dims on top (`projection`), and the Matryoshka dims are
then prefixes of its output. The network is `backbone.net`, so that a fine-tuning recipe can treat the pretrained part
apart from what is new (the projection, the heads).

The preprocessing the network was trained with (resolution, mean/std, interpolation, the eval crop) comes with it:
`spec["preprocessing"]`, recorded in config.json's data block and used by training, evaluation, embedding and
`MatryoshkaEncoder`. config.json also records the architecture and its arguments (`model.timm`), so a run folder
rebuilds offline, without timm reaching the Hub: the weights are in its model.safetensors.
"""

import dataclasses
import json
import math
import os
import warnings

import torch
import torch.nn as nn

from mrl import UserError
from mrl.utils import hub_access

TIMM_PREFIX, HUB_PREFIX = "timm/", "hf-hub:"
TORCHVISION = ("resnet18", "resnet34", "resnet50")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def is_external(name):
    """Whether --model names a timm model (by name, Hub id or folder) rather than one of mrl.models' backbones."""
    return name.startswith((TIMM_PREFIX, HUB_PREFIX)) or os.path.isdir(name)


class PretrainedBackbone(nn.Module):
    """A timm network (or a torchvision ResNet) without its classifier, and an optional linear projection on its
    pooled feature. forward: image -> embedding (embed_dim)."""

    def __init__(self, net, width, embed_dim=None):
        super().__init__()
        self.net, self.width = net, width
        self.projection = nn.Linear(width, embed_dim) if embed_dim else None
        self.embed_dim = embed_dim or width

    def forward(self, x):
        z = self.net(x)
        return self.projection(z) if self.projection is not None else z


@dataclasses.dataclass
class Source:
    """Where a backbone comes from: a timm model's spec (None for mrl.models' own) and the preprocessing its weights
    expect (None: the dataset preset's)."""
    timm: dict = None
    preprocessing: dict = None


def resolve_backbone(model, pretrained, image_size=None):
    """The Source of --model: a timm model brings its spec and preprocessing, a torchvision ResNet with --pretrained
    the preprocessing of its ImageNet weights; anything else trains with the dataset preset's."""
    if is_external(model):
        spec = timm_spec(model, image_size)
        return Source(spec, spec.pop("preprocessing"))
    if pretrained and model in TORCHVISION:
        return Source(None, torchvision_preprocessing(model, image_size))
    return Source()


def with_preprocessing(preset, preprocessing, augment=None):
    """The dataset preset with the backbone's normalization (and `augment`, the training augmentation for it)."""
    if preprocessing is None:
        return preset
    return dataclasses.replace(preset, mean=tuple(preprocessing["mean"]), std=tuple(preprocessing["std"]),
                               augment=augment or preset.augment)


def import_timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm models need timm: pip install timm (requirements.txt pins the tested version)") from None
    return timm


def timm_spec(name, image_size=None):
    """What builds the timm model `name` (see the module docstring) with `image_size` px inputs: {"architecture",
    "model_args", "source", "preprocessing"}. A folder or a Hub repo's config.json is read here (one small download
    for a Hub id); no weights are read."""
    if name.startswith(TIMM_PREFIX):
        architecture, model_args, source = name[len(TIMM_PREFIX):], {}, name
        pretrained_cfg = None
    else:
        config = read_timm_config(name)
        architecture, model_args = config["architecture"], dict(config.get("model_args") or {})
        pretrained_cfg = config.get("pretrained_cfg") or {}
        # a folder by its absolute path: evaluate.py --before_finetuning reloads it from wherever it runs
        source = os.path.abspath(name) if os.path.isdir(name) else name
    model_args.pop("num_classes", None)  # the classifier goes: the pooled feature is the embedding
    timm = import_timm()
    if not timm.is_model(architecture.split(".")[0]):
        raise UserError(f"--model {name}: timm {timm.__version__} has no architecture {architecture!r}")
    with torch.device("meta"):  # only its pretrained config is read: no memory, no initialization
        probe = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    cfg = {**probe.pretrained_cfg, **(pretrained_cfg or {})}
    size = tuple(cfg.get("input_size", (3, 224, 224)))[1:]
    if image_size and (image_size, image_size) != size and cfg.get("fixed_input_size"):
        # a ViT's position embeddings are sized for its resolution: timm resamples them to the new one when loading
        model_args["img_size"] = image_size
    preprocessing = timm_preprocessing(cfg, image_size or size[0], name)
    return {"architecture": architecture, "model_args": model_args, "source": source, "preprocessing": preprocessing}


def timm_preprocessing(cfg, image_size, name):
    """timm's eval preprocessing of a pretrained config, at `image_size`: resize the shorter side (or both sides,
    crop_mode squash) to floor(image_size / crop_pct), then center-crop image_size, as timm.data.create_transform."""
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in ("center", "squash"):
        warnings.warn(f"{name}: crop_mode {crop_mode!r} is evaluated as 'center' here", stacklevel=3)
        crop_mode = "center"
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:  # 'random' and the like are training-time choices
        interpolation = "bilinear"
    return {"image_size": int(image_size), "resize": math.floor(image_size / (cfg.get("crop_pct") or 0.875)),
            "crop_mode": crop_mode, "interpolation": interpolation,
            "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
            "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))]}


def read_timm_config(name):
    """config.json of a timm model in the Hub's layout, from a folder or an hf-hub: id."""
    if os.path.isdir(name):
        file = os.path.join(name, "config.json")
        if not os.path.isfile(file):
            raise UserError(f"--model {name} is a folder without config.json: not a timm model in the Hub's layout")
    else:
        file = hub_file(name[len(HUB_PREFIX):], "config.json")
    with open(file) as f:
        config = json.load(f)
    if "architecture" not in config:
        raise UserError(f"--model {name}: its config.json names no timm architecture (not a timm model)")
    return config


def hub_file(repo, filename):
    """A file of a Hub repo, from the cache when the Hub cannot be reached; one line when neither has it."""
    from huggingface_hub import hf_hub_download

    problem = hub_access.hub_unreachable()
    try:
        return hf_hub_download(repo, filename, local_files_only=problem is not None)
    except Exception as e:
        why = f"{problem} and it is not in the local cache" if problem else hub_access.one_line(e)
        raise UserError(f"cannot get {filename} of {repo} from the Hugging Face Hub: {why}") from None


def build_timm(spec, pretrained, embed_dim=None):
    """The timm network `spec` describes (timm_spec, or config.json's model.timm), with its pretrained weights or
    freshly initialized; wrapped with the optional projection."""
    timm = import_timm()
    name = spec["source"]
    kwargs = {"num_classes": 0, **spec["model_args"]}
    if not pretrained:
        net = timm.create_model(spec["architecture"], pretrained=False, **kwargs)
    else:
        # by the kind of source the spec recorded: a folder that is gone is not a reason to take timm's weights
        if name.startswith(TIMM_PREFIX):
            source = spec["architecture"]  # timm/<name>: timm's own pretrained tag, on the Hub as timm/<name>
        elif name.startswith(HUB_PREFIX):
            source = name
        elif os.path.isdir(name):
            source = "local-dir:" + os.path.abspath(name)
        else:
            raise UserError(f"the pretrained weights came from the folder {name}, which is not there (moved, or the "
                            f"run was copied from another machine): put a copy of it there, or a link to one (ln -s "
                            f"COPY {name})")
        problem = None if source.startswith("local-dir:") else hub_access.hub_unreachable()  # said with the error
        try:
            net = timm.create_model(source, pretrained=True, **kwargs)
        except Exception as e:  # timm, huggingface_hub and the network raise many types
            why = f"{problem}, and the weights are not in the local cache" if problem else hub_access.one_line(e)
            raise UserError(f"cannot load the pretrained weights of {name}: {why}") from None
    # the pooled feature's width: a pre-logits layer (head_hidden_size) sits between the pooling and the classifier
    return PretrainedBackbone(net, getattr(net, "head_hidden_size", None) or net.num_features, embed_dim)


def torchvision_weights(name):
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def torchvision_preprocessing(name, image_size=None):
    """The eval preprocessing of torchvision's DEFAULT ImageNet weights for `name` (resize the shorter side, center
    crop), at `image_size` if given (the resize scaled with it)."""
    transforms = torchvision_weights(name).transforms()
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    size = image_size or crop
    return {"image_size": size, "resize": round(size * resize / crop), "crop_mode": "center",
            "interpolation": transforms.interpolation.value, "mean": list(transforms.mean), "std": list(transforms.std)}


def load_torchvision_weights(net, name):
    """torchvision's DEFAULT ImageNet weights into the ResNet `net` (its fc is gone: the rest must match)."""
    weights = torchvision_weights(name)
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as e:  # no network: urllib's errors
        raise UserError(f"cannot download torchvision's {name} weights {weights} ({hub_access.one_line(e)}); put {weights.url} "
                        "in $TORCH_HOME/hub/checkpoints to use it offline") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    net.load_state_dict(state)
