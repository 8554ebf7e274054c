"""The backbones of this repo, which map an image to an embedding: the blog's 4-conv CNN and torchvision's ResNets
(with the CIFAR stem, GroupNorm or BlurPool where asked); build_backbone also builds any timm model
(mrl.models.pretrained_backbones)."""


import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mrl import UserError
from mrl.models.pretrained_backbones import build_timm, load_torchvision_weights

BACKBONES = ("cnn4", "cnn4_bn", "resnet18", "resnet34", "resnet50")
# The ResNets' normalization layers: BatchNorm (torchvision's and the references'), or GroupNorm, whose statistics are
# per image, so that a run on N processes computes exactly what it computes on one (BatchNorm normalizes each
# process's share of the batch unless --sync_bn).
NORMS = {"batch": nn.BatchNorm2d, "group": lambda channels: nn.GroupNorm(32, channels)}


class CNN4(nn.Module):
    """The blog's feature extractor: four conv + max-pool stages, flatten, one linear layer to 1024 dims.

    The blog's network has no nonlinearity anywhere, so as a function of the image it is linear up to the
    max-pools. `batchnorm=True` (model name `cnn4_bn`) adds BatchNorm + ReLU after every conv, which is what
    most readers assume the blog's network has.
    """

    # (out_channels, kernel, max-pool) per stage, from the blog: 256x256 -> 81 -> 25 -> 11 -> 4 (x512 = 8192).
    STAGES = ((256, 12, 3), (512, 5, 3), (512, 3, 2), (512, 3, 2))

    def __init__(self, image_size=256, embed_dim=1024, batchnorm=False):
        super().__init__()
        layers, channels, side = [], 3, image_size
        for out_channels, kernel, pool in self.STAGES:
            layers.append(nn.Conv2d(channels, out_channels, kernel, bias=not batchnorm))
            if batchnorm:
                layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(pool))
            channels, side = out_channels, (side - kernel + 1) // pool
            if side < 1:
                name = "cnn4_bn" if batchnorm else "cnn4"
                raise UserError(f"{name} needs images of at least {CNN4.min_image_size()} px, got --image_size "
                                f"{image_size}")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(channels * side * side, embed_dim)
        self.embed_dim = embed_dim

    @classmethod
    def min_image_size(cls):
        side = 1
        for _, kernel, pool in reversed(cls.STAGES):
            side = side * pool + kernel - 1
        return side

    def forward(self, x):
        return self.fc(self.features(x))


class ResNet(nn.Module):
    """A torchvision ResNet without its classifier; the embedding is the pooled last stage (512 or 2048 dims).

    `cifar_stem` swaps the 7x7 stride-2 conv and the max-pool for one 3x3 stride-1 conv, the usual change for
    32x32 images, which the ImageNet stem would shrink to 8x8 before the first residual stage. `norm="group"`
    replaces every BatchNorm with a GroupNorm of 32 groups (Wu & He, 2018; torchvision initializes both alike).
    `blurpool=True` low-passes the input of every strided conv (apply_blurpool), as the MRL paper's ImageNet recipe
    does; it changes those convs' state-dict keys (`...conv2.weight` -> `...conv2.conv.weight`), so it is recorded
    in the model (`self.blurpool`) and in config.json. `pretrained=True` loads torchvision's ImageNet weights (the
    standard stem and BatchNorm only); `embed_dim` adds a linear `projection` from the pooled feature (`width`).
    """

    def __init__(self, name="resnet18", cifar_stem=False, norm="batch", blurpool=False, pretrained=False,
                 embed_dim=None):
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None, norm_layer=NORMS[norm])
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            # initialized like torchvision initializes every other conv of the ResNet (and as mrl-pytorch's
            # encoders/models.py re-initializes its replaced first conv), not with nn.Conv2d's default
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        self.cifar_stem, self.blurpool, self.width = cifar_stem, blurpool, net.fc.in_features
        net.fc = nn.Identity()
        if pretrained:  # torchvision's ImageNet weights (the stem, norm and convs are torchvision's own: checked)
            load_torchvision_weights(net, name)
        if blurpool:
            apply_blurpool(net)
        self.net = net
        # --embed_dim: a linear layer from the pooled feature to the embedding (no keys when absent: older runs load)
        self.projection = nn.Linear(self.width, embed_dim) if embed_dim else None
        self.embed_dim = embed_dim or self.width

    def forward(self, x):
        z = self.net(x)
        return self.projection(z) if self.projection is not None else z


def build_backbone(name, image_size, cifar_stem=None, norm="batch", blurpool=False, pretrained=False, embed_dim=None,
                   timm=None):
    """The backbone called `name` for square images of side `image_size`.

    `cifar_stem=None` picks the CIFAR stem automatically for images under 64 px (ResNets only); `norm` picks the
    ResNets' normalization layers (NORMS); `blurpool` blurs before every strided conv (ResNets only, BlurPoolConv2d).
    `pretrained`: start from the network's pretrained weights (torchvision's ImageNet weights for the ResNets, the
    timm model's own); `embed_dim`: a linear layer to that many dims on top of the pooled feature (--embed_dim).
    `timm`: a timm model's spec (mrl.models.pretrained_backbones.timm_spec, or config.json's model.timm), for --model naming
    a timm model.
    """
    if timm is not None:
        if cifar_stem or norm != "batch" or blurpool:
            raise UserError(f"--cifar_stem, --norm and --blurpool change torchvision's ResNets; {name} is a timm "
                            "model, used as it is")
        return build_timm(timm, pretrained, embed_dim)
    if name not in BACKBONES:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(BACKBONES)}, timm/<name>, "
                        "hf-hub:<user>/<repo> (a timm model on the Hub) or a folder holding a timm model")
    if name.startswith("cnn4") and (pretrained or embed_dim):
        raise UserError(f"--pretrained and --embed_dim are for the ResNets and timm models; {name} is the blog's CNN")
    if pretrained and (cifar_stem or norm != "batch" or blurpool):
        raise UserError(f"--pretrained loads torchvision's ImageNet {name}, with its own stem and BatchNorm: it goes "
                        "with none of --cifar_stem on, --norm group, --blurpool")
    if name.startswith("cnn4") and blurpool:  # cnn4 downsamples with max-pools only: there is no strided conv
        raise UserError(f"--blurpool is for the ResNets; {name} has no strided convolution")
    if name.startswith("cnn4"):
        if norm != "batch":
            has = "BatchNorm" if name == "cnn4_bn" else "no normalization"
            raise UserError(f"--norm {norm} is for the ResNets; {name} has {has}")
        return CNN4(image_size=image_size, batchnorm=name == "cnn4_bn")
    if cifar_stem is None:
        cifar_stem = image_size < 64 and not pretrained
    return ResNet(name, cifar_stem=cifar_stem, norm=norm, blurpool=blurpool, pretrained=pretrained,
                  embed_dim=embed_dim)


class BlurPoolConv2d(nn.Module):
    """A strided conv that first blurs its input with a fixed [1, 2, 1] x [1, 2, 1] / 16 filter, per channel.

    Subsampling without a low-pass aliases, so a network's output changes when the image shifts by one pixel;
    blurring first makes it more shift-invariant and more accurate (Zhang, "Making Convolutional Networks
    Shift-Invariant Again", ICML 2019). FFCV's ResNet recipe, which the MRL paper trains with, does exactly this:
    a 3x3 depthwise blur with stride 1 and zero padding of 1, then the original conv with its own stride.

    The filter is a constant, not a weight: it is a non-persistent buffer (it moves with `.to()` but is not in the
    state dict), so the wrapped conv's keys are `<name>.conv.weight` and nothing else.
    """

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.register_buffer("blur_filter", blur_filter(conv.in_channels), persistent=False)

    def forward(self, x):
        blurred = F.conv2d(x, self.blur_filter, padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def blur_filter(channels):
    """BlurPool's filter: [1, 2, 1] x [1, 2, 1] / 16 for each of `channels` channels, shaped for a depthwise conv."""
    taps = torch.tensor([1.0, 2.0, 1.0])
    return (torch.outer(taps, taps) / 16).expand(channels, 1, 3, 3).clone()


def apply_blurpool(module):
    """Wrap, in place, every conv of `module` that downsamples (stride > 1) a map of at least 16 channels into a
    BlurPoolConv2d; returns `module`. FFCV's rule: the stem's 3-channel conv is left alone, and in a torchvision
    ResNet the wrapped convs are each stage's first strided 3x3 (conv1 in BasicBlock, conv2 in Bottleneck) and
    1x1 downsample. Convs already wrapped are left as they are, so applying it twice changes nothing."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        elif not isinstance(child, BlurPoolConv2d):
            apply_blurpool(child)
    return module
