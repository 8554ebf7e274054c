"""benchmarks/fidelity_ssl.py's helpers: the mrl-pytorch encoder export that evaluate.py reads, the untrained side
(train_ssl.py at lr 0), and the per-dim comparison table.

mrl-pytorch itself is not installed in CI (its import package is also called `mrl`), so the export is checked on an
encoder built the way its encoders/models.py builds one (a torchvision ResNet-18 with the CIFAR first conv and no
max-pool, every child but fc in an nn.Sequential, then a 1x1 average pool and a squeeze); the script itself checks
every real export against the embeddings the seed's own network computed.
"""

import argparse
import importlib.util
import json

import pytest
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T
from conftest import ROOT
from safetensors.torch import save_file
from test_train_ssl import IN_PROCESS, run_main

import train_ssl
from mrl.batches.decode import open_image
from mrl.batches.transforms import build_transform
from mrl.data.sources import load_splits
from mrl.eval.protocols import load_run
from mrl.run_folder.final_model import load_model

spec = importlib.util.spec_from_file_location("fidelity_ssl", ROOT / "benchmarks" / "fidelity_ssl.py")
fidelity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fidelity)


class Squeeze(nn.Module):
    def forward(self, x):
        return x.squeeze(-1).squeeze(-1)


def seed_like_encoder():
    """An encoder laid out as mrl-pytorch's resnet18(modify_model=True), with BatchNorm statistics that are not the
    defaults (so a key that lands on the wrong BatchNorm shows)."""
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    encoder = nn.Sequential(*list(net.children())[:-1], nn.AdaptiveAvgPool2d(1), Squeeze())
    generator = torch.Generator().manual_seed(1)
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
            module.weight.data.copy_(1 + 0.1 * torch.randn(module.num_features, generator=generator))
    return encoder.eval()


def test_seed_encoder_export_loads_in_evaluate_with_the_seeds_embeddings_and_inputs(tmp_path):
    encoder = seed_like_encoder()
    seed_folder, folder = tmp_path / "seed_run", tmp_path / "seed_s0"
    seed_folder.mkdir()
    probe = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = encoder(probe)
    tensors = fidelity.seed_to_ours(encoder.state_dict(), fidelity.resnet_child_names())
    save_file({**tensors, "reference.input": probe, "reference.output": reference},
              str(seed_folder / "seed_target.safetensors"))
    (seed_folder / "seed_run.json").write_text(json.dumps({"bn_mode_while_training": "eval (as shipped)"}))
    args = argparse.Namespace(dataset="digits", dataset_path="", image_size=8, max_train_samples=64, epochs=1,
                              batch_size=32, lr=3e-4)
    fidelity.import_seed_encoder(args, 0, str(seed_folder), str(folder), "target")

    backbone, heads, config = load_run(str(folder), "cpu")
    assert heads is None and config["kind"] == "ssl" and config["model"]["cifar_stem"] is True
    assert config["data"]["mean"] == [0.0] * 3 and config["data"]["std"] == [1.0] * 3
    assert config["ssl"]["nest"] == "projector" and config["ssl"]["exported"] == "target"
    # evaluate.py's preprocessing of this config feeds the [0, 1] pixels that mrl-pytorch's inference transform
    # (Resize, ToTensor) gives, and our ResNet with the exported weights embeds them as the seed's encoder does
    splits = load_splits("digits", seed=0, max_train_samples=64)
    images = [open_image(item) for item in splits.test.with_format(None)["image"][:16]]
    ours_input = torch.stack([build_transform("ssl", 8, config["data"]["mean"], config["data"]["std"], train=False)(im)
                              for im in images])
    seed_input = torch.stack([T.Compose([T.Resize((8, 8)), T.ToTensor()])(im) for im in images])
    assert torch.equal(ours_input, seed_input) and 0.5 < seed_input.max() <= 1.0
    with torch.no_grad():
        ours, seeds = backbone(ours_input), encoder(seed_input)
    assert ours.shape == (16, 512) and seeds.abs().max() > 0.1
    torch.testing.assert_close(ours, seeds, rtol=1e-5, atol=1e-5)
    # the importing side refuses weights that do not reproduce the seed's reference embeddings
    with pytest.raises(AssertionError, match="does not reproduce"):
        fidelity.check_same_embeddings(backbone, probe, reference * 1.01)


def test_untrained_side_at_lr_0_keeps_every_weight_and_calibrates_batchnorm(tmp_path, monkeypatch):
    """train_ssl.py --lr 0 --epochs 1 (Adam with weight decay 1e-5, the EMA target exported): the saved backbone's
    parameters are bit-identical to its initialization, its BatchNorm statistics are the training images'."""
    built = []

    def build_and_remember(*args, **kwargs):
        backbone = build_backbone(*args, **kwargs)
        built.append({k: v.clone() for k, v in backbone.state_dict().items()})
        return backbone

    build_backbone = train_ssl.build_backbone
    monkeypatch.setattr(train_ssl, "build_backbone", build_and_remember)
    run_main([*IN_PROCESS, "--method", "relic", "--epochs", "1", "--lr", "0", "--knn_every", "0",
              "--output_dir", tmp_path / "untrained"])
    backbone, _, config = load_model(str(tmp_path / "untrained"))
    assert config["ssl"]["exported"] == "target" and len(built) == 1
    saved, initial = backbone.state_dict(), built[0]
    parameters = {name for name, _ in backbone.named_parameters()}
    assert parameters and all(torch.equal(saved[name], initial[name]) for name in parameters)
    bn = "net.bn1.running_mean"
    assert torch.equal(initial[bn], torch.zeros_like(initial[bn])) and saved[bn].abs().max() > 1e-3


def test_the_table_pairs_ours_and_the_seed_by_training_seed_and_reports_their_spread():
    def rows(probe):
        return {"probe": dict(zip((8, 512), probe)), "knn": {8: 0.5, 512: 0.5}, "pca_probe": {8: 0.5, 512: 0.5}}

    results = {"ours": {0: rows((0.30, 0.40)), 1: rows((0.34, 0.41))},
               "seed": {0: rows((0.20, 0.42)), 1: rows((0.22, 0.42))},
               "untrained": {0: rows((0.10, 0.30))}}
    summary, comparison = fidelity.summarize(results, [0, 1], [8, 512])
    assert summary["ours"]["probe"][8]["mean"] == pytest.approx(0.32)
    assert summary["untrained"]["probe"][512] == {"mean": 0.30, "spread": 0.0, "n": 1, "values": [0.30]}
    d8, d512 = comparison["probe"][8], comparison["probe"][512]
    assert d8["paired"] == pytest.approx([0.10, 0.12]) and d8["noise"] == pytest.approx(0.04) and d8["beyond_noise"]
    assert d512["ours_minus_seed"] == pytest.approx(-0.015) and d512["noise"] == pytest.approx(0.01)
    assert d512["beyond_noise"]
    assert comparison["knn"][8] == {"ours_minus_seed": 0.0, "paired": [0.0, 0.0], "noise": 0.0, "beyond_noise": False}
    table = fidelity.markdown(summary, comparison, ["ours", "seed", "untrained"], [8, 512])
    assert "| 8 | 0.320 | 0.210 | 0.100 | +11.0 * | 4.0 |" in table
    assert "| 512 | 0.405 | 0.420 | 0.300 | -1.5 * | 1.0 |" in table
