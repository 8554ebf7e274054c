"""Fine-tuning pretrained backbones into Matryoshka embeddings: timm models and torchvision's ResNets, offline.

No weights can be downloaded here, so the pretrained sources are made locally the way they are published: a timm
model saved in the Hub's layout (config.json + model.safetensors, timm's own save_for_hf) is read as `--model
<folder> --pretrained`, and torchvision's ResNet-18 weights file is put where torchvision caches its downloads.
"""

import json
import shutil
import socket

import pytest
import timm
import torch
import torchvision
from conftest import run_script
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_sample_image

from mrl import UserError
from mrl.batches.transforms import build_transform, eval_transform
from mrl.matryoshka import MatryoshkaClassifier, MatryoshkaHeads
from mrl.models.backbones import build_backbone
from mrl.models.pretrained_backbones import build_timm, resolve_backbone, timm_preprocessing, torchvision_preprocessing
from mrl.pretrained import MatryoshkaEncoder
from mrl.run_folder.final_model import load_model
from mrl.train.optim import parameter_groups

pytestmark = pytest.mark.xdist_group("pretrained_backbones")  # the module's runs are built once, on one worker

# A ViT at CIFAR scale (patch 4 at 32 px, 64 dims, 2 blocks) and a ConvNeXt with one block per stage: small enough to
# train a digits epoch in seconds, with their own preprocessing (bicubic, crop 0.9, mean/std 0.5) to carry through.
VIT = dict(architecture="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
CONVNEXT = dict(architecture="convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
DIGITS = ["--dataset", "digits", "--max_train_samples", 320, "--batch_size", 32, "--num_workers", 0,
          "--decoder", "pil"]


def save_timm_source(folder, architecture, seed, **model_args):
    """A timm model with random weights, saved as timm publishes models on the Hub."""
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    vit, convnext = dict(VIT), dict(CONVNEXT)
    return {"vit": save_timm_source(root / "vit", vit.pop("architecture"), 0, **vit),
            "convnext": save_timm_source(root / "convnext", convnext.pop("architecture"), 1, **convnext)}


@pytest.fixture(scope="module")
def vit_run(sources, tmp_path_factory):
    """Two epochs on digits from the ViT, the first with the backbone frozen, a checkpoint after each."""
    tmp = tmp_path_factory.mktemp("vit_run")
    run_script("train_supervised.py", *DIGITS, "--model", sources["vit"], "--pretrained", "--epochs", 2,
               "--freeze_backbone_epochs", 1, "--dims", "8,16,64", "--checkpointing_steps", "epoch",
               "--checkpoints_total_limit", 3, "--output_dir", tmp / "out", tmp_path=tmp)
    return tmp


def photos():
    return [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]


def source_features(folder, images):
    """The source model's pooled features under its own preprocessing, as timm gives them."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    with torch.no_grad():
        return model(torch.stack([transform(image) for image in images]))


def test_frozen_epoch_keeps_the_pretrained_network_and_its_embeddings(vit_run, sources):
    """After the frozen epoch the network is the source's, bit for bit, its embeddings are the source model's pooled
    features under the source's own preprocessing, and the optimizer has no state for it; only the heads moved."""
    first = sorted((vit_run / "out" / "checkpoints").iterdir())[0]
    source = load_file(sources["vit"] / "model.safetensors")
    state = load_file(first / "model.safetensors")
    for key, value in source.items():
        assert torch.equal(state[f"backbone.net.{key}"], value), key
    optimizer = torch.load(first / "optimizer.bin", weights_only=False)
    assert len(optimizer["state"]) == 2 * 3  # AdamW stepped the 3 heads' weights and biases, and nothing else

    backbone, _, config = load_model(str(first))
    images = photos()
    pixels = torch.stack([eval_transform(config)(image) for image in images])
    with torch.no_grad():
        ours = backbone(pixels)
    torch.testing.assert_close(ours, source_features(sources["vit"], images), rtol=1e-5, atol=1e-5)


def test_unfrozen_epoch_trains_the_network_at_its_lower_rate(vit_run, sources):
    source = load_file(sources["vit"] / "model.safetensors")
    final = load_file(vit_run / "out" / "model.safetensors")
    moved = [key for key, value in source.items() if not torch.equal(final[f"backbone.net.{key}"], value)]
    assert len(moved) == len(source)  # every tensor of the network trained in epoch 2
    config = json.loads((vit_run / "out" / "config.json").read_text())
    assert config["args"]["backbone_lr_scale"] == 0.1 and config["args"]["lr_schedule"] == "cosine"  # the recipe
    assert config["model"]["timm"]["architecture"] == "vit_tiny_patch16_224"
    assert config["model"]["timm"]["model_args"]["patch_size"] == 4 and config["model"]["pretrained"]
    assert config["data"]["mean"] == [0.5] * 3 and config["data"]["augment"] == "pretrained"
    assert config["data"]["preprocessing"] == {"image_size": 32, "resize": 35, "crop_mode": "center",
                                               "interpolation": "bicubic"}


def test_from_pretrained_rebuilds_the_run_offline_bit_identically(vit_run, sources, tmp_path, monkeypatch):
    """The run folder alone rebuilds the model: with the source folder gone and no network, the weights are those of
    model.safetensors and the embeddings those the run's backbone computes."""
    moved = tmp_path / "elsewhere"
    shutil.move(str(sources["vit"]), moved)
    try:
        def no_network(*args, **kwargs):
            raise AssertionError("the rebuild reached for the network")

        monkeypatch.setattr(socket, "create_connection", no_network)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        model = MatryoshkaEncoder.from_pretrained(str(vit_run / "out"), device="cpu")
    finally:
        shutil.move(str(moved), sources["vit"])
    saved = load_file(vit_run / "out" / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(saved)
    for key in saved:
        assert torch.equal(state[key], saved[key]), key
    images = photos()
    backbone, _, config = load_model(str(vit_run / "out"))
    with torch.no_grad():
        expected = backbone(torch.stack([eval_transform(config)(image) for image in images]))
    assert torch.equal(model.encode(images, normalize=False), expected)


def test_resume_across_the_unfreezing_continues_exactly(vit_run, sources):
    resumed = vit_run / "resumed"
    first = sorted((vit_run / "out" / "checkpoints").iterdir())[0]
    shutil.copytree(first, resumed / "checkpoints" / first.name)
    run_script("train_supervised.py", *DIGITS, "--model", sources["vit"], "--pretrained", "--epochs", 2,
               "--freeze_backbone_epochs", 1, "--dims", "8,16,64", "--output_dir", resumed,
               "--resume_from_checkpoint", "latest", tmp_path=vit_run)
    a, b = load_file(vit_run / "out" / "model.safetensors"), load_file(resumed / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_two_processes_train_what_one_does(vit_run, sources):
    """The same run on 2 processes (DDP, which must let the frozen epoch leave the network without gradients): a
    LayerNorm ViT without dropout computes what one process does, up to float summation order."""
    two = vit_run / "two"
    result = run_script("train_supervised.py", *DIGITS, "--model", sources["vit"], "--pretrained", "--epochs", 2,
                        "--freeze_backbone_epochs", 1, "--dims", "8,16,64", "--output_dir", two, tmp_path=vit_run,
                        processes=2)
    assert "2 process(es)" in result.stdout
    a, b = load_file(vit_run / "out" / "model.safetensors"), load_file(two / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_convnext_with_a_projection_and_layer_decay_trains_and_evaluates_before_and_after(sources, tmp_path):
    """A ConvNeXt with --embed_dim 32 on top and layer-wise decay trains a digits epoch; evaluate.py puts the
    pretrained start (its 64-dim pooled feature cut to d, and PCA to d) next to the fine-tuned run. The start's
    features are cached by its weights: new weights saved into its folder are evaluated anew; and a folder that is
    gone is one line naming it, never timm's published weights of the same architecture in its place."""
    out, source = tmp_path / "out", shutil.copytree(sources["convnext"], tmp_path / "convnext")
    run_script("train_supervised.py", *DIGITS, "--model", source, "--pretrained", "--epochs", 1,
               "--image_size", 32, "--embed_dim", 32, "--layer_decay", 0.7, "--output_dir", out, tmp_path=tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["embed_dim"] == 32 and config["model"]["projection"] == 32
    assert config["heads"]["dims"] == [8, 16, 32]
    evaluate = ("evaluate.py", "--checkpoint", out, "--before_finetuning", "--dims", "8,32", "--num_workers", 0,
                "--probe_max_iter", 20, "--max_train_samples", 200, "--max_eval_samples", 100, "--no-retrieval_grid")
    run_script(*evaluate, tmp_path=tmp_path)
    results = json.loads((out / "eval" / "results.json").read_text())
    check_before_and_after(results)

    convnext = dict(CONVNEXT)
    save_timm_source(source, convnext.pop("architecture"), 2, **convnext)  # new weights, same folder
    run_script(*evaluate, "--no-pca", tmp_path=tmp_path)
    again = {run["label"]: run for run in json.loads((out / "eval" / "results.json").read_text())["runs"]}
    before = {run["label"]: run for run in results["runs"]}
    assert again["out"]["per_dim"][0]["probe"] == before["out"]["per_dim"][0]["probe"]  # its cache, unchanged
    # the start's features were extracted again from the new weights: other features, another probe
    assert ([row["probe"] for row in again["out (before fine-tuning)"]["per_dim"]]
            != [row["probe"] for row in before["out (before fine-tuning)"]["per_dim"]])

    shutil.move(source, tmp_path / "elsewhere")  # what --before_finetuning rebuilds the start from, gone
    with pytest.raises(UserError) as error:
        build_timm(config["model"]["timm"], pretrained=True)
    assert str(error.value) == (
        f"the pretrained weights came from the folder {source}, which is not there (moved, or the run was copied "
        f"from another machine): put a copy of it there, or a link to one (ln -s COPY {source})")


def check_before_and_after(results):
    runs = {run["label"]: run for run in results["runs"]}
    assert set(runs) == {"out", "out (before fine-tuning)"}
    start = runs["out (before fine-tuning)"]
    assert start["embed_dim"] == 64 and start["kind"] == "pretrained start"
    for row in start["per_dim"]:
        # truncation and PCA of the pretrained feature: above chance (0.1); measured 0.58-0.82 (probe) and 0.79-0.90
        # (PCA) at d = 8 and 32 with 1 and 2 threads, far above the bound
        assert 0.1 < row["probe"] <= 1 and 0.1 < row["pca_probe"] <= 1
    assert [row["dim"] for row in runs["out"]["per_dim"]] == [8, 32] and "head" in runs["out"]["per_dim"][0]
    assert [row["dim"] for row in start["per_dim"]] == [8, 32] and "head" not in start["per_dim"][0]


def test_torchvision_resnet_loads_its_cached_imagenet_weights_and_frozen_batchnorm_stays(tmp_path):
    """torchvision's ResNet-18 weights, read from torchvision's download cache (made here: the real file cannot be
    downloaded), with their preprocessing; a frozen epoch leaves every weight and BatchNorm statistic as loaded."""
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    torch.manual_seed(2)
    reference = torchvision.models.resnet18()
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics that a training step would visibly move
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    out = tmp_path / "out"
    run_script("train_supervised.py", *DIGITS, "--model", "resnet18", "--pretrained", "--image_size", 32,
               "--epochs", 1, "--freeze_backbone_epochs", 1, "--max_train_samples", 64, "--max_eval_samples", 32,
               "--output_dir", out, tmp_path=tmp_path,
               env={"TORCH_HOME": str(tmp_path / "torch")})
    state = load_file(out / "model.safetensors")
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[f"backbone.net.{key}"], value), key
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["cifar_stem"] is False  # the pretrained stem, even at 32 px
    assert config["data"]["preprocessing"] == {"image_size": 32, "resize": round(32 * 256 / 224),
                                               "crop_mode": "center", "interpolation": "bilinear"}


def test_ssl_continues_from_a_pretrained_timm_backbone(sources, tmp_path):
    out = tmp_path / "out"
    run_script("train_ssl.py", "--dataset", "digits", "--model", sources["vit"], "--pretrained", "--epochs", 1,
               "--batch_size", 64, "--max_train_samples", 128, "--num_workers", 0, "--knn_every", 0,
               "--knn_bank_samples", 128, "--max_eval_samples", 64,
               "--proj_hidden_dim", 32, "--proj_out_dim", 16, "--output_dir", out, tmp_path=tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["timm"]["model_args"]["embed_dim"] == 64 and config["data"]["mean"] == [0.5] * 3
    model = MatryoshkaEncoder.from_pretrained(str(out), device="cpu")
    assert model.encode(photos(), dim=8).shape == (2, 8)


# ---- preprocessing and parameter groups, in-process

@pytest.mark.parametrize("crop_mode,interpolation,crop_pct", [("center", "bicubic", 0.9), ("squash", "bilinear", 1.0)])
def test_eval_preprocessing_equals_timms(crop_mode, interpolation, crop_pct):
    cfg = {"input_size": (3, 48, 48), "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": crop_mode,
           "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3)}
    ours = timm_preprocessing(cfg, 48, "test")
    transform = build_transform("pretrained", 48, ours["mean"], ours["std"], train=False, preprocessing=ours)
    theirs = timm.data.create_transform(**{k: v for k, v in cfg.items()}, is_training=False)
    for image in photos():  # non-square photos: the crop and the aspect handling matter
        assert torch.equal(transform(image), theirs(image))


def test_torchvision_preprocessing_equals_the_weights_own():
    ours = torchvision_preprocessing("resnet50")
    assert (ours["image_size"], ours["resize"]) == (224, 232)  # ResNet-50's DEFAULT weights are IMAGENET1K_V2
    transform = build_transform("pretrained", 224, ours["mean"], ours["std"], train=False, preprocessing=ours)
    theirs = torchvision.models.ResNet50_Weights.DEFAULT.transforms()
    for image in photos():
        torch.testing.assert_close(transform(image), theirs(torchvision.transforms.functional.pil_to_tensor(image)),
                                   atol=0.05, rtol=0)  # PIL's resize vs torch's antialiased one: within a few levels


def test_layer_decay_scales_each_vit_layer_and_keeps_the_heads_at_full_rate():
    vit = dict(VIT)
    spec = {"architecture": vit.pop("architecture"), "model_args": vit, "source": "test"}
    model = MatryoshkaClassifier(build_backbone("vit", 32, timm=spec, embed_dim=16), MatryoshkaHeads([8, 16], 10))
    groups = parameter_groups(model, 0.05, "norm_bias", backbone_lr_scale=0.1, layer_decay=0.5)
    scale = {id(p): group.get("lr_scale", 1.0) for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    # timm's layers of this ViT: the stem (patch embedding, tokens) 0, the blocks 1 and 2, the final norm with the last
    assert scale[id(named["backbone.net.patch_embed.proj.weight"])] == pytest.approx(0.1 * 0.5 ** 2)
    assert scale[id(named["backbone.net.blocks.0.attn.qkv.weight"])] == pytest.approx(0.1 * 0.5)
    assert scale[id(named["backbone.net.blocks.1.attn.qkv.weight"])] == pytest.approx(0.1)
    assert scale[id(named["backbone.net.norm.weight"])] == pytest.approx(0.1)
    assert scale[id(named["backbone.projection.weight"])] == 1.0 and scale[id(named["heads.classifiers.0.weight"])] == 1.0
    no_decay = {id(p) for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(named["backbone.net.norm.weight"]) in no_decay and id(named["backbone.projection.weight"]) not in no_decay
    assert sum(len(group["params"]) for group in groups) == len(named)


def test_without_a_recipe_the_parameter_groups_are_those_of_earlier_versions():
    model = MatryoshkaClassifier(build_backbone("resnet18", 16), MatryoshkaHeads([8, 512], 10))
    groups = parameter_groups(model, 0.01, "bn_named")
    decay = [p for n, p in model.named_parameters() if "bn" not in n]
    assert [len(g["params"]) for g in groups] == [len(decay), len(list(model.parameters())) - len(decay)]
    assert all(a is b for a, b in zip(groups[0]["params"], decay)) and all("lr_scale" not in g for g in groups)


# ---- what a user can get wrong: one line each

def test_bad_sources_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="has no architecture 'no_such_net'"):
        resolve_backbone("timm/no_such_net", pretrained=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        resolve_backbone(str(tmp_path / "empty"), pretrained=True)
    monkeypatch.setattr("mrl.utils.hub_access.hub_unreachable", lambda timeout=5: "cannot reach the Hugging Face Hub (test)")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub .test. and it is not in the local cache"):
        resolve_backbone("hf-hub:someone/some-model", pretrained=True)
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # timm not installed
    with pytest.raises(UserError, match="pip install timm"):
        resolve_backbone("timm/resnet18", pretrained=True)


def test_pretrained_where_the_weights_cannot_fit_is_refused():
    with pytest.raises(UserError, match="--pretrained and --embed_dim are for the ResNets and timm models"):
        build_backbone("cnn4", 256, pretrained=True)
    with pytest.raises(UserError, match="goes with none of --cifar_stem on, --norm group, --blurpool"):
        build_backbone("resnet18", 32, norm="group", pretrained=True)
