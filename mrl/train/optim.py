"""The training scripts' optimizers -- AdamW (the blog), SGD with momentum (the MRL reference's ImageNet recipe), Adam
(mrl-pytorch) -- with the parameter groups that skip weight decay; and their per-step schedules (learning rate, EMA
momentum, resolution), precomputed arrays as in DINO: stateless, so a resumed run reads the value at its step."""

import math

import numpy as np
import torch

from mrl import UserError

# Which parameters skip weight decay (--no_decay). Every rule looks at the parameter's name and shape only.
NO_DECAY = {
    "none": lambda name, p: False,  # everything decays: torch's default, the blog
    # the MRL reference's (and FFCV's) rule: parameters whose name contains "bn" -- a torchvision ResNet's bn1/bn2/bn3
    # BatchNorms. Its downsample BatchNorms (downsample.1), the convolutions, the heads and all biases do decay.
    "bn_named": lambda name, p: "bn" in name,
    # the common modern rule: every 1-d parameter (norm weights, biases)
    "norm_bias": lambda name, p: p.ndim <= 1,
}
OPTIMIZERS = ("adamw", "sgd", "adam")  # adam: weight decay as L2 in the gradient (mrl-pytorch, train_ssl.py's default)


# A backbone's network -- the pretrained part of a fine-tuning run -- is the module `backbone.net` (mrl.models,
# mrl.models.pretrained_backbones): `backbone.net.*` in a supervised model, `online.backbone.net.*` in an SSL one.
PRETRAINED_PART = "backbone.net."


def parameter_groups(model, weight_decay, no_decay, backbone_lr_scale=1.0, layer_decay=None):
    """Parameter groups: those that decay with `weight_decay` and those the `no_decay` rule exempts, and with a
    fine-tuning recipe one pair per learning-rate scale, each group's "lr_scale" multiplying the scheduled rate
    (mrl.train.loop): `backbone_lr_scale` for the backbone's network, times `layer_decay` ** (layers above) when given
    (timm's layer groups: the stem lowest, the last block at 1), 1 for what is new (a projection, the heads).
    Empty groups are left out; without a fine-tuning recipe there are the two groups of earlier versions, in the
    model's parameter order, so their saved optimizer states load."""
    rule = NO_DECAY[no_decay]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = lr_scales(model, named, backbone_lr_scale, layer_decay)
    groups = {}
    for (n, p), scale in zip(named, scales):
        key = (scale, rule(n, p))
        groups.setdefault(key, {"params": [], "weight_decay": 0.0 if key[1] else weight_decay,
                                **({"lr_scale": scale} if scale != 1.0 else {})})["params"].append(p)
    # the order of earlier versions: decaying parameters first; the scales from the backbone's lowest layer up
    return [groups[key] for key in sorted(groups, key=lambda key: (key[1], key[0]))]


def lr_scales(model, named, backbone_lr_scale, layer_decay):
    """The learning-rate scale of every (name, parameter) in `named`."""
    if backbone_lr_scale == 1.0 and not layer_decay:
        return [1.0] * len(named)
    nets = [(prefix, module) for prefix, module in model.named_modules() if prefix.endswith(PRETRAINED_PART[:-1])]
    layers = {}
    if layer_decay:
        for prefix, net in nets:
            if not hasattr(net, "group_matcher"):
                raise UserError("--layer_decay needs a timm backbone: its layer groups (group_matcher) say which "
                                "layer each parameter belongs to")
            from timm.models import group_parameters

            layer_map = group_parameters(net, net.group_matcher(coarse=False), reverse=True)
            top = max(layer_map.values())
            layers.update({f"{prefix}.{name}": top - layer for name, layer in layer_map.items()})
    scales = []
    for name, _ in named:
        pretrained = any(name.startswith(prefix + ".") for prefix, _ in nets)
        scales.append(backbone_lr_scale * layer_decay ** layers.get(name, 0) if pretrained and layer_decay
                      else backbone_lr_scale if pretrained else 1.0)
    return scales


def build_optimizer(model, name, lr, weight_decay, momentum=0.9, no_decay="none", backbone_lr_scale=1.0,
                    layer_decay=None):
    groups = parameter_groups(model, weight_decay, no_decay, backbone_lr_scale, layer_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


# ---- schedules

def exponential_schedule(base, gamma, epochs, steps_per_epoch):
    """`base * gamma**epoch`, constant within an epoch: torch's ExponentialLR stepped once per epoch (the blog)."""
    return base * gamma ** np.repeat(np.arange(epochs), steps_per_epoch).astype(np.float64)


def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Linear warmup from `warmup_start` to `base`, then a half cosine from `base` down (or up) to `final`."""
    total, warmup = epochs * steps_per_epoch, min(int(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch)
    ramp = np.linspace(warmup_start, base, warmup, endpoint=False)
    t = np.arange(total - warmup) / max(total - warmup, 1)
    return np.concatenate([ramp, final + 0.5 * (base - final) * (1 + np.cos(math.pi * t))])


def constant_schedule(base, epochs, steps_per_epoch):
    return np.full(epochs * steps_per_epoch, float(base))


def warmup_then(name, base, epochs, steps_per_epoch, warmup_epochs=0.0, gamma=1.0, warmup_start_factor=1e-4):
    """train_supervised.py's --lr_schedule, per optimizer step: a linear warmup over `warmup_epochs` from
    `warmup_start_factor * base` to `base`, then

      linear       down to 0 at the end of the last epoch: the MRL reference's (FFCV's) ImageNet schedule, whose
                   per-epoch values interp(epoch, [0, warmup, epochs], [1e-4 * base, base, 0]) are themselves
                   interpolated over each epoch's steps -- the same thing as evaluating the ramp at the fractional
                   epoch `epoch + step / steps_per_epoch`, which is what is done here
      cosine       a half cosine down to 0
      exponential  `base * gamma**k` in the k-th epoch after the warmup: the blog's ExponentialLR, stepped per epoch
      constant     `base`

    With warmup_epochs = 0 the exponential schedule is exactly exponential_schedule's.
    """
    total = epochs * steps_per_epoch
    steps = np.arange(total)
    t = steps // steps_per_epoch + (steps % steps_per_epoch) / steps_per_epoch  # fractional epoch at each step
    after = np.maximum(t - warmup_epochs, 0.0)  # epochs since the warmup ended
    remaining = max(epochs - warmup_epochs, 1e-12)
    if name == "linear":
        lr = base * (1 - after / remaining)
    elif name == "cosine":
        lr = 0.5 * base * (1 + np.cos(math.pi * after / remaining))
    elif name == "exponential":
        lr = base * gamma ** np.floor(after)
    elif name == "constant":
        lr = np.full(total, float(base))
    else:
        raise ValueError(f"unknown learning-rate schedule {name!r}")
    if warmup_epochs > 0:
        ramp = np.interp(t, [0.0, warmup_epochs], [warmup_start_factor * base, base])
        lr = np.where(t < warmup_epochs, ramp, lr)
    return lr.astype(np.float64)


def progressive_resolution(epoch, min_res, max_res, start_ramp, end_ramp):
    """The training resolution of `epoch` (0-based) under FFCV's progressive resizing, as the MRL reference trains
    ImageNet: `min_res` up to epoch `start_ramp`, `max_res` from `end_ramp` on, and in between the linear
    interpolation rounded to a multiple of 32."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res]) / 32)) * 32
