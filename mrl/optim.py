"""The training scripts' optimizers -- AdamW (the blog), SGD with momentum (the MRL reference's ImageNet recipe), Adam
(mrl-pytorch) -- with the parameter groups that skip weight decay."""

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


def parameter_groups(model, weight_decay, no_decay):
    """Two groups: parameters that decay with `weight_decay`, and those the `no_decay` rule exempts (empty groups
    are left out; the order of the parameters is the model's, so optimizer states saved by earlier runs load)."""
    rule = NO_DECAY[no_decay]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not rule(n, p)]
    exempt = [p for n, p in named if rule(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}] if decay else []
    return groups + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])


def build_optimizer(model, name, lr, weight_decay, momentum=0.9, no_decay="none"):
    groups = parameter_groups(model, weight_decay, no_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
