"""mrl.hub.convert_reference on state dicts laid out exactly as RAIVNLab/MRL saves them: a DDP-wrapped torchvision
ResNet-50 (`module.` keys), BlurPool's `<conv>.conv.weight` + `<conv>.blur_filter`, and their heads' module names.
Their modules and forwards are restated here in a few lines, from their MRL.py, utils.py and train_imagenet.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from safetensors.torch import load_file

from mrl import UserError
from mrl.hub.convert_reference import convert as convert_checkpoint
from mrl.hub.convert_reference import get_args_parser, load_backbone, load_heads, main
from mrl.pretrained import MatryoshkaEncoder
from mrl.run_folder.config import read_config
from mrl.run_folder.final_model import load_model
from mrl.run_folder.layout import MODEL_FILE
from mrl.utils import script

pytestmark = pytest.mark.xdist_group("test_convert_reference")  # one worker builds the module's ResNet-50s
NESTING = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]


class TheirBlurPoolConv2d(nn.Module):
    """Their BlurPoolConv2d: the filter is a (persistent) buffer, so it is in their checkpoints."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.register_buffer("blur_filter", torch.tensor([[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]]).repeat(
            conv.in_channels, 1, 1, 1) / 16.0)

    def forward(self, x):
        return self.conv(F.conv2d(x, self.blur_filter, padding=1, groups=self.conv.in_channels))


def their_blurpool(module):
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, TheirBlurPoolConv2d(child))
        else:
            their_blurpool(child)


def their_head(variant, k=None):
    """(fc module with their names, their forward: features -> list of logits per dim)."""
    if variant == "mrl":  # MRL_Linear_Layer: nesting_classifier_i = Linear(d_i, 1000)
        fc = nn.Module()
        for i, d in enumerate(NESTING):
            setattr(fc, f"nesting_classifier_{i}", nn.Linear(d, 1000))
        return fc, lambda x: [getattr(fc, f"nesting_classifier_{i}")(x[:, :d]) for i, d in enumerate(NESTING)]
    if variant in ("mrl-e", "mrl-e-released"):  # MRL_Linear_Layer(efficient=True), or SingleHeadNestedLinear
        linear = nn.Linear(2048, 1000)
        fc = nn.Module() if variant == "mrl-e" else linear
        if variant == "mrl-e":
            fc.nesting_classifier_0 = linear
        return fc, lambda x: [x[:, :d] @ linear.weight[:, :d].t() + linear.bias for d in NESTING]
    fc = nn.Linear(k, 1000)  # FixedFeatureLayer(k, 1000), or torchvision's fc for the baseline (k = 2048)
    return fc, lambda x: [x[:, :k] @ fc.weight.t() + fc.bias]


@pytest.fixture(scope="module")
def resnet50s():
    """Their trunk (fc: the identity) with and without BlurPool, with BatchNorm statistics that are not the
    identity."""
    nets = {}
    for blurpool in (True, False):
        torch.manual_seed(int(blurpool))
        net = torchvision.models.resnet50(weights=None)
        net.fc = nn.Identity()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
        if blurpool:
            their_blurpool(net)
        nets[blurpool] = net.eval()
    return nets


def save_theirs(net, fc, path):
    """torch.save of DDP's state_dict, as they save it; they train channels_last, so their 4-d tensors are NHWC."""
    net.fc = fc
    torch.save({f"module.{k}": v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                for k, v in net.state_dict().items()}, path)
    net.fc = nn.Identity()


def convert_theirs(net, variant, tmp_path, given="auto", k=None):
    """Save their checkpoint with this head, convert it; returns (config, their head's forward)."""
    torch.manual_seed(2)
    fc, their_forward = their_head(variant, k)
    save_theirs(net, fc, tmp_path / "final_weights.pt")
    return convert_checkpoint(str(tmp_path / "final_weights.pt"), str(tmp_path / "run"), given), their_forward


@pytest.mark.parametrize("variant,blurpool,given", [("mrl", True, "auto"), ("baseline", False, "baseline")])
def test_converted_model_computes_their_embedding_and_logits(resnet50s, tmp_path, variant, blurpool, given):
    net = resnet50s[blurpool]
    config, their_forward = convert_theirs(net, "ff" if variant == "baseline" else variant, tmp_path, given, k=2048)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = net(x)  # fc is the identity: the pooled 2048 features
        expected = torch.stack(their_forward(features))
        backbone, heads, _ = load_model(str(tmp_path / "run"))  # what evaluate.py and embed.py load
        z = backbone(x)
        logits = heads(z)
    assert config["converted_from"]["variant"] == variant and config["model"]["blurpool"] == blurpool
    assert backbone.blurpool == blurpool and heads.dims == (NESTING if variant == "mrl" else [2048])
    assert not config["heads"]["tied"] and config["heads"]["baseline"] == (variant == "baseline")
    torch.testing.assert_close(z, features, rtol=1e-5, atol=1e-5)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.1  # logits that differ from image to image and class to class
    assert config["heads"]["class_names"][:2] == ["n01440764", "n01443537"] and heads.num_classes == 1000


@pytest.mark.parametrize("variant,given,k,dims", [
    ("mrl-e", "auto", None, NESTING),  # MRL_Linear_Layer(efficient=True): fc.nesting_classifier_0
    ("mrl-e-released", "mrl-e", None, NESTING),  # the released files' SingleHeadNestedLinear: fc.weight
    ("ff", "auto", 16, [16]),  # FixedFeatureLayer(16, 1000)
])
def test_every_head_variant_computes_their_logits(variant, given, k, dims):
    # the heads alone, from their fc's state dict (the whole file's conversion is the tests above)
    torch.manual_seed(2)
    fc, their_forward = their_head(variant, k)
    found, heads = load_heads(fc.state_dict(), given, "final_weights.pt")
    z = torch.randn(2, 2048)
    with torch.no_grad():
        torch.testing.assert_close(heads(z), torch.stack(their_forward(z)), rtol=1e-4, atol=1e-4)
    assert found == variant.removesuffix("-released")
    assert heads.dims == dims and heads.tied == variant.startswith("mrl-e")


def test_converted_folder_loads_as_a_model_with_the_reference_preprocessing(resnet50s, tmp_path, capsys):
    fc, _ = their_head("mrl")
    save_theirs(resnet50s[True], fc, tmp_path / "final_weights.pt")
    script.run(main, get_args_parser().parse_args([str(tmp_path / "final_weights.pt"), str(tmp_path / "run")]))
    assert "mrl ResNet-50 with BlurPool, heads at dims [8, 16" in capsys.readouterr().out
    config = read_config(str(tmp_path / "run"))
    assert config["data"]["splits"]["dataset"] == "imagenet" and config["data"]["splits"]["test_fraction"] == 0.0
    model = MatryoshkaEncoder.from_pretrained(tmp_path / "run", device="cpu")
    assert model.config["model"]["blurpool"] and model.dims == NESTING and len(model.class_names) == 1000
    # the reference's evaluation preprocessing: Resize 256 -> CenterCrop 224, ImageNet mean and std
    resize, crop, _, normalize = model.preprocess.transforms
    assert isinstance(resize, T.Resize) and resize.size == 256 and isinstance(crop, T.CenterCrop)
    assert list(crop.size) == [224, 224]
    assert normalize.mean == [0.485, 0.456, 0.406] and normalize.std == [0.229, 0.224, 0.225]
    assert "RAIVNLab/MRL" in (tmp_path / "run" / "README.md").read_text()
    # save_pretrained (what push_to_hub uploads) writes the same weights and config
    model.save_pretrained(tmp_path / "copy")
    ours, copy = load_file(tmp_path / "run" / MODEL_FILE), load_file(tmp_path / "copy" / MODEL_FILE)
    assert ours.keys() == copy.keys() and all(torch.equal(ours[k], copy[k]) for k in ours)
    assert read_config(str(tmp_path / "copy")) == read_config(str(tmp_path / "run"))
    with pytest.raises(UserError, match="already holds a model"):
        convert_checkpoint(str(tmp_path / "final_weights.pt"), str(tmp_path / "run"))


def test_heads_that_cannot_be_told_apart_or_do_not_fit_are_refused():
    full = {"weight": torch.randn(1000, 2048), "bias": torch.randn(1000)}
    with pytest.raises(UserError, match="--variant baseline or --variant mrl-e"):
        load_heads(full, "auto", "x.pt")
    with pytest.raises(UserError, match="does not hold a mrl head"):
        load_heads(full, "mrl", "x.pt")
    with pytest.raises(UserError, match="does not hold a baseline head.*first 64"):
        load_heads({"weight": torch.randn(1000, 64)}, "baseline", "x.pt")
    with pytest.raises(UserError, match="unknown classifier layout"):
        load_heads({"head.weight": torch.randn(1000, 2048)}, "auto", "x.pt")
    with pytest.raises(UserError, match="shape \\(10, 2048\\)"):
        load_heads({"weight": torch.randn(10, 2048)}, "ff", "x.pt")
    # a Linear saved without bias (their Linear(bias=False)) gets a zero one: the same logits
    variant, heads = load_heads({"weight": torch.randn(1000, 64)}, "auto", "x.pt")
    assert variant == "ff" and heads.dims == [64] and not heads.classifiers[0].bias.any()


def test_a_blur_filter_other_than_theirs_is_refused(resnet50s):
    state = dict(resnet50s[True].state_dict())
    load_backbone(state, "final_weights.pt")
    state["layer3.0.conv2.blur_filter"] = state["layer3.0.conv2.blur_filter"] * 2
    with pytest.raises(UserError, match="layer3.0.conv2.blur_filter is not the \\[1, 2, 1\\]"):
        load_backbone(state, "final_weights.pt")


def test_other_files_are_one_line(tmp_path):
    resnet18 = {f"module.{k}": v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    torch.save(resnet18, tmp_path / "r18.pt")
    with pytest.raises(UserError, match="not a torchvision ResNet-50.*missing.*another shape"):
        convert_checkpoint(str(tmp_path / "r18.pt"), str(tmp_path / "out"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as ended:  # as `python -m mrl.hub.convert_reference notes.pt out` ends
        script.run(main, get_args_parser().parse_args([str(tmp_path / "notes.pt"), str(tmp_path / "out")]))
    message = str(ended.value.code)
    assert message.startswith("error: ") and "is not a PyTorch checkpoint" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert "--variant {auto,mrl,mrl-e,ff,baseline}" in get_args_parser().format_help()
