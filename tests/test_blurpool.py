import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mrl import UserError
from mrl.models.backbones import BlurPoolConv2d, apply_blurpool, build_backbone
from mrl.run_folder.final_model import build_model

# The convs FFCV's rule wraps in torchvision's ResNets (stride > 1 and >= 16 input channels): each later stage's
# first strided conv and its 1x1 downsample; never the stem's 3-channel conv1.
STRIDED = {
    "resnet18": ["layer2.0.conv1", "layer2.0.downsample.0", "layer3.0.conv1", "layer3.0.downsample.0",
                 "layer4.0.conv1", "layer4.0.downsample.0"],
    "resnet50": ["layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
                 "layer4.0.conv2", "layer4.0.downsample.0"],
}


def blur_by_hand(x):
    """[1, 2, 1] x [1, 2, 1] / 16 per channel, stride 1, zero padding of 1: a weighted sum of the 9 shifted copies."""
    padded = F.pad(x, (1, 1, 1, 1))
    taps = [1, 2, 1]
    h, w = x.shape[-2:]
    return sum(taps[a] * taps[b] * padded[..., a:a + h, b:b + w] for a in range(3) for b in range(3)) / 16


def test_blurpool_conv_is_blur_then_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    wrapped = BlurPoolConv2d(conv)
    x = torch.randn(2, 16, 9, 9)
    out = wrapped(x)
    assert out.shape == (2, 8, 5, 5)
    torch.testing.assert_close(out, conv(blur_by_hand(x)))
    # the blur is not the identity: the wrapped conv computes something else than the conv alone
    assert (out - conv(x)).abs().max() > 1e-2
    # a constant image stays constant inside (the filter sums to 1); the zero padding darkens the border
    flat = torch.ones(1, 16, 6, 6)
    blurred = F.conv2d(flat, wrapped.blur_filter, padding=1, groups=16)
    torch.testing.assert_close(blurred[..., 1:-1, 1:-1], flat[..., 1:-1, 1:-1])
    assert blurred[0, 0, 0, 0].item() == pytest.approx(9 / 16)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_apply_blurpool_wraps_the_strided_convs_with_16_or_more_channels_once(name):
    net = getattr(torchvision.models, name)(weights=None)
    assert apply_blurpool(net) is net
    wrapped = sorted(n for n, m in net.named_modules() if isinstance(m, BlurPoolConv2d))
    assert wrapped == sorted(STRIDED[name])
    assert isinstance(net.conv1, nn.Conv2d)  # stride 2 but 3 input channels
    apply_blurpool(net)  # a second pass leaves the wrapped convs alone
    assert sorted(n for n, m in net.named_modules() if isinstance(m, BlurPoolConv2d)) == wrapped


def test_blurpool_backbone_keys_and_output():
    torch.manual_seed(0)
    plain, blurred = build_backbone("resnet50", 64), build_backbone("resnet50", 64, blurpool=True)
    assert (plain.blurpool, blurred.blurpool) == (False, True)
    # without blurpool the keys are torchvision's (checkpoints of earlier runs load); with it, the wrapped convs'
    # weights move to `.conv.weight` and the constant filter is not saved
    reference = {f"net.{k}" for k in torchvision.models.resnet50(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(plain.state_dict()) == reference
    moved = {f"net.{name}.weight" for name in STRIDED["resnet50"]}
    assert set(blurred.state_dict()) == (reference - moved) | {k.replace(".weight", ".conv.weight") for k in moved}
    blurred.load_state_dict({k.replace(".weight", ".conv.weight") if k in moved else k: v
                             for k, v in plain.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        z_plain, z_blurred = plain.eval()(x), blurred.eval()(x)
    assert z_blurred.shape == (2, 2048)
    assert not torch.allclose(z_plain, z_blurred)  # same weights, but the strided convs see blurred maps


def test_blurpool_needs_a_resnet():
    with pytest.raises(UserError, match="--blurpool is for the ResNets"):
        build_backbone("cnn4", 256, blurpool=True)


def test_config_rebuilds_blurpool_and_old_configs_have_none():
    config = {"model": {"backbone": "resnet18", "cifar_stem": True, "norm": "batch"}, "data": {"image_size": 16}}
    backbone, _ = build_model(config)  # a config.json written before the key existed
    assert not backbone.blurpool and not any(isinstance(m, BlurPoolConv2d) for m in backbone.modules())
    backbone, _ = build_model({**config, "model": {**config["model"], "blurpool": True}})
    assert backbone.blurpool and sum(isinstance(m, BlurPoolConv2d) for m in backbone.modules()) == 6
