"""End to end: train_ssl.py on real data (scikit-learn's digits at 8x8 px), as a user runs it.

The main ReLIC run and its resume run as subprocesses (the real command line, offline W&B); the shorter SimCLR and
BYOL runs call train_ssl.main in this process, so that hooks can watch the model while it trains.
"""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from accelerate.state import AcceleratorState, GradientState
from conftest import run_script
from PIL import Image
from safetensors.torch import load_file
from wandb_history import config as wandb_config
from wandb_history import history, run_dirs

import datasets
import train_ssl
from mrl import UserError
from mrl.batches.transforms import Collate, ImageTransform, build_transform
from mrl.data.presets import IMAGENET_STATS
from mrl.data.sources import load_splits
from mrl.eval.retrieval import neighbor_metrics
from mrl.run_folder.final_model import load_model
from mrl.run_folder.layout import list_checkpoints
from mrl.ssl.methods import METHODS
from mrl.ssl.model import SSLModel, build_model

# its module fixtures are built once: all of its tests run on one pytest-xdist worker (pytest.ini)
pytestmark = pytest.mark.xdist_group("test_train_ssl")

DIMS = [8, 16, 32, 64, 128, 256, 512]
DIGITS = ["--dataset", "digits", "--image_size", "8", "--num_workers", "0", "--knn_every", "1",
          "--crop_min_scale", "0.6", "--jitter_strength", "0.5", "--lr", "2e-3", "--log_every", "1"]
SMALL = [*DIGITS, "--batch_size", "16", "--max_train_samples", "64"]
# ReLIC, 64 images in batches of 16: 4 optimizer steps per epoch, 8 in all, a checkpoint every 3 (mid-epoch).
RELIC = [*SMALL, "--method", "relic", "--epochs", "2", "--checkpointing_steps", "3", "--checkpoints_total_limit", "5"]
IN_PROCESS = [*SMALL, "--report_to", "none"]


def run_main(argv):
    """train_ssl.main in this process, with Accelerate's process-wide state reset around it."""
    args = train_ssl.get_args_parser().parse_args([str(a) for a in argv])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        train_ssl.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return args


@pytest.fixture(scope="module")
def relic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relic")
    result = run_script("train_ssl.py", *RELIC, "--output_dir", tmp / "out", tmp_path=tmp, wandb=True)
    return tmp, result


def train_rows(tmp):
    return {r["_step"]: r for r in history(run_dirs(tmp / "wandb")[0]) if "train/loss" in r}


def test_relic_run_reports_finite_per_dim_losses_and_online_knn_far_above_chance(relic):
    tmp, result = relic
    rows = [row for _, row in sorted(train_rows(tmp).items())]
    assert len(rows) == 8 and all(np.isfinite(r["train/loss"]) for r in rows)
    # every prefix's loss starts near ln(16), ReLIC's instance discrimination at chance with logit scale exp(0) = 1.
    # Over 17 runs of this setting (seeds 0-14, 1 and 2 threads; benchmarks/outcome_spread.py) the farthest prefix was
    # 0.02-0.09 from it: 0.25 is far outside that and far inside a trained loss (well under 2 at this scale)
    assert all(abs(rows[0][f"train/loss_d{d}"] - np.log(16)) < 0.25 for d in DIMS)
    assert abs(rows[-1]["train/logit_scale"] - rows[0]["train/logit_scale"]) > 1e-3  # the temperature is trained
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    assert metrics["dims"] == DIMS and [h["epoch"] for h in metrics["history"]] == [0, 1, 2]  # 0: untrained
    knn = metrics["knn_accuracy"]
    # 10 classes: chance is 0.1. The same 17 runs: the full width at 0.44-0.71, ahead of 8 dims by 0.19-0.51. 0.25
    # is as far below the lowest as the range is wide; the ordering's margin is 4 sd of its spread.
    assert knn[-1] > 0.25 and knn[-1] > knn[0]
    assert "online kNN accuracy per dim" in result.stdout


def test_wandb_gets_per_dim_loss_and_knn_series_and_a_table_at_monotonic_steps(relic):
    tmp, _ = relic
    rows = history(run_dirs(tmp / "wandb")[0])
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps)
    knn_rows = [r for r in rows if "knn/accuracy_d8" in r]
    assert [r["_step"] for r in knn_rows] == [0, 4, 8] and [r["epoch"] for r in knn_rows] == [0, 1, 2]
    assert all(f"knn/accuracy_d{d}" in r for r in knn_rows for d in DIMS)
    first = train_rows(tmp)[1]
    assert all(f"train/loss_d{d}" in first for d in DIMS)
    assert first["train/lr"] == pytest.approx(2e-3) and first["train/logit_scale"] == pytest.approx(1.0, abs=0.01)
    assert first["train/ema_gamma"] == 0.0 and train_rows(tmp)[3]["train/ema_gamma"] > 0.99  # copy, then EMA
    assert list((tmp / "wandb").glob("wandb/offline-run-*/files/media/table/knn_accuracy_per_dim*.table.json"))
    # the page says where chance is, measures the gradient norm without clipping, and charts kNN against log2(dim)
    cfg = wandb_config(run_dirs(tmp / "wandb")[0])
    assert cfg["loss_per_dim_at_chance"] == pytest.approx(np.log(16)) and cfg["knn_accuracy_at_chance"] == 0.1
    assert all(r["train/grad_norm"] > 0 for r in train_rows(tmp).values())
    assert "charts/knn_accuracy_vs_dim" in cfg["_wandb"]["visualize"]


def test_saved_backbone_loads_like_evaluate_and_reproduces_the_final_knn(relic):
    tmp, _ = relic
    backbone, heads, config = load_model(tmp / "out")
    assert heads is None and config["kind"] == "ssl" and config["model"]["embed_dim"] == 512
    assert config["ssl"]["exported"] == "target" and config["data"]["augment"] == "ssl"
    weights = load_file(tmp / "out" / "model.safetensors")
    assert any(k.startswith("backbone.") for k in weights) and any(k.startswith("projector.") for k in weights)
    data = config["data"]
    splits = load_splits(data["dataset"], seed=data["seed"], val_fraction=data["val_fraction"],
                         test_fraction=data["test_fraction"], max_train_samples=config["args"]["max_train_samples"])
    plain = ImageTransform(build_transform(data["augment"], data["image_size"], data["mean"], data["std"], train=False))
    features = {}
    with torch.no_grad():
        for name, ds in (("bank", splits.train), ("val", splits.val)):  # the bank: all 64 train images
            ds = ds.with_transform(plain)
            batch = Collate()([ds[i] for i in range(len(ds))])
            features[name] = (backbone(batch["pixel_values"]), batch["labels"])
    (bank_z, bank_y), (val_z, val_y) = features["bank"], features["val"]
    knn = [row["knn"] for row in neighbor_metrics(bank_z, bank_y, val_z, val_y, DIMS, 10, device="cpu")]
    reported = json.loads((tmp / "out" / "metrics.json").read_text())["knn_accuracy"]
    np.testing.assert_allclose(knn, reported, atol=1.5 / len(val_y))


def test_resume_mid_epoch_continues_exactly_with_the_ema_target(relic):
    """N steps == K steps + resume + (N - K) steps: the same losses, kNN accuracies and final weights."""
    tmp, _ = relic
    checkpoint = tmp / "out" / "checkpoints" / "step_00000003"
    assert int(load_file(checkpoint / "model.safetensors")["target.num_updates"]) == 3  # one EMA update per step
    resumed = tmp / "resumed"
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    run_script("train_ssl.py", *RELIC, "--output_dir", resumed, "--resume_from_checkpoint", "latest",
               tmp_path=tmp / "resumed", wandb=True)
    full, again = train_rows(tmp), train_rows(tmp / "resumed")
    assert sorted(again) == list(range(4, 9))
    # the same W&B run continues (its id is in the checkpoint)
    assert run_dirs(tmp / "resumed" / "wandb")[0].split("-")[-1] == run_dirs(tmp / "wandb")[0].split("-")[-1]
    for step in again:  # bit-identical: same batches, augmentations, target network and temperature
        for key in ("train/loss", "train/loss_d8", "train/logit_scale", "train/ema_gamma"):
            assert again[step][key] == full[step][key], (step, key)
    original = json.loads((tmp / "out" / "metrics.json").read_text())
    continued = json.loads((resumed / "metrics.json").read_text())
    assert continued["history"] == original["history"]
    a, b = load_file(tmp / "out" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_byol_trains_in_train_mode_after_eval_and_moves_the_target_once_per_optimizer_step(tmp_path, monkeypatch):
    """mrl-pytorch left BatchNorm in eval mode after its first evaluation; here every training forward -- online
    and target -- runs in train mode, also after the kNN monitor put the backbone in eval mode. Under gradient
    accumulation the target moves once per optimizer step."""
    modes, losses, updates, knn_calls = [], [], [], []
    forward, update, monitor = SSLModel.forward, SSLModel.update_target, train_ssl.knn_monitor

    def recording_forward(self, *views):
        modes.append([m.training for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
        loss, per_dim = forward(self, *views)
        losses.append(loss.item())
        return loss, per_dim

    monkeypatch.setattr(SSLModel, "forward", recording_forward)
    monkeypatch.setattr(SSLModel, "update_target", lambda self, step: updates.append(step) or update(self, step))
    monkeypatch.setattr(train_ssl, "knn_monitor", lambda *a: knn_calls.append(len(modes)) or monitor(*a))
    run_main([*IN_PROCESS, "--method", "byol", "--gpu_augment", "--grad_accum_steps", "2", "--epochs", "2",
              "--checkpointing_steps", "4", "--output_dir", tmp_path / "out"])
    assert len(modes) == 8 and knn_calls == [0, 4, 8]  # 4 batches per epoch; the monitor at the start, after each epoch
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 1.0, losses  # 7 dims x BYOL's 2 - 2 cos: starts near 14
    assert all(all(flags) and len(flags) > 40 for flags in modes)
    assert updates == [0, 1, 2, 3]  # 2 optimizer steps per epoch
    checkpoint = load_file(tmp_path / "out" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert int(checkpoint["target.num_updates"]) == 4
    exported = load_file(tmp_path / "out" / "model.safetensors")
    target = {k[len("target.module."):]: v for k, v in checkpoint.items() if k.startswith("target.module.backbone.")}
    assert target and all(torch.equal(exported[k], v) for k, v in target.items())  # the EMA backbone is saved
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert all(0.1 < a <= 1 for a in metrics["knn_accuracy"])


def test_two_processes_train_and_resume_mid_epoch_bit_identically_with_gpu_augmentation(tmp_path):
    """DDP on two CPU processes (gloo): the frozen EMA target inside the DDP-wrapped model, per-process augmentation
    seeds on the device, gathered kNN features; a mid-epoch resume ends with the same weights."""
    common = [*DIGITS, "--method", "byol", "--gpu_augment", "--batch_size", "16", "--max_train_samples", "32",
              "--epochs", "2", "--knn_every", "0", "--checkpointing_steps", "3"]  # 2 steps per epoch
    result = run_script("train_ssl.py", *common, "--output_dir", tmp_path / "full", tmp_path=tmp_path, processes=2)
    assert "2 process(es)" in result.stdout
    resumed = tmp_path / "resumed" / "checkpoints" / "step_00000003"  # mid-way through the second epoch
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", resumed)
    run_script("train_ssl.py", *common, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", "latest",
               tmp_path=tmp_path, processes=2)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def image_dataset(folder, splits):
    """A local dataset in save_to_disk layout: random 12x12 RGB images, two classes; `splits` {name: size}. A split
    named "unlabeled" has no label column, as STL-10's."""
    rng = np.random.default_rng(0)
    parts = {}
    for name, n in splits.items():
        images = [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]
        if name == "unlabeled":
            parts[name] = datasets.Dataset.from_dict({"image": images},
                                                     features=datasets.Features({"image": datasets.Image()}))
        else:
            features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
            parts[name] = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]},
                                                     features=features)
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


def test_simclr_pretrains_on_train_plus_unlabeled_with_the_seeds_projector_nesting(tmp_path, capsys):
    """An STL-10-like local dataset (train, test and an unlabeled split), and the optional optimizer features."""
    folder = image_dataset(tmp_path / "stl_like", {"train": 40, "test": 10, "unlabeled": 40})
    run_main(["--dataset", "custom", "--dataset_path", folder, "--image_size", "8", "--batch_size", "16",
              "--num_workers", "0", "--report_to", "none", "--method", "simclr", "--nest", "projector",
              "--proj_hidden_dim", "64", "--epochs", "1", "--lr_schedule", "cosine", "--warmup_epochs", "0.5",
              "--no_decay_norm_bias", "--memory_format", "contiguous", "--output_dir", tmp_path / "out"])
    assert "76 training images (36 train + 40 unlabeled)" in capsys.readouterr().out  # 4 of train held out for val
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["ssl"] == {"method": "simclr", "nest": "projector", "dims": [8, 16, 32, 64], "exported": "online",
                             "projector": {"hidden_dim": 64, "out_dim": 64}}
    assert config["data"]["mean"] == list(IMAGENET_STATS[0])  # the custom preset's normalization, saved for evaluation
    backbone, _, _ = load_model(tmp_path / "out")
    assert backbone(torch.zeros(2, 3, 8, 8)).shape == (2, 512)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["dims"] == DIMS  # kNN on the backbone


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls, nt_xent = [], METHODS["simclr"].loss

    def poisoned(a, b, temperature):  # finite for the first two steps (one call per dim), NaN from the third on
        calls.append(1)
        return nt_xent(a, b, temperature) * (float("nan") if len(calls) > 2 * len(DIMS) else 1.0)

    monkeypatch.setitem(METHODS, "simclr", dataclasses.replace(METHODS["simclr"], loss=poisoned))
    with pytest.raises(UserError, match="optimizer step 3"):
        run_main([*IN_PROCESS, "--method", "simclr", "--epochs", "1", "--checkpointing_steps", "2",
                  "--output_dir", tmp_path / "out"])
    assert [p.rsplit("_", 1)[-1] for p in list_checkpoints(tmp_path / "out")] == ["00000002"]


@pytest.mark.parametrize("args,message", [
    (["--dims", "8,1024"], "--dims must lie in 1..512"),
    (["--nest", "projector", "--proj_hidden_dim", "64", "--dims", "8,128"], "must lie in 1..64 (--proj_hidden_dim)"),
    (["--batch_size", "1"], "needs at least 2"),
    (["--crop_min_scale", "0"], "--crop_min_scale must be in (0, 1]"),
    (["--max_train_samples", "8"], "fewer than one batch"),
] + ([] if torch.cuda.is_available() else [(["--fp16_precision"], "--fp16_precision needs a CUDA GPU")]))
def test_bad_input_is_a_clear_user_error(tmp_path, args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run_main([*IN_PROCESS, "--epochs", "1", "--output_dir", tmp_path / "out", *args])


def test_a_dataset_without_images_and_an_unknown_method_are_refused(tmp_path, capsys):
    folder = tmp_path / "text"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"] * 10, "label": [0, 1] * 10})}) \
        .save_to_disk(str(folder))
    with pytest.raises(UserError, match="has no image column"):
        run_main(["--dataset", "custom", "--dataset_path", folder, "--output_dir", tmp_path / "out",
                  "--report_to", "none"])
    with pytest.raises(SystemExit):
        train_ssl.get_args_parser().parse_args(["--method", "moco"])
    assert "invalid choice: 'moco'" in capsys.readouterr().err


def test_defaults_are_mrl_pytorchs_and_its_flag_names_are_accepted():
    parser = train_ssl.get_args_parser()
    args = parser.parse_args([])
    assert (args.method, args.dataset, args.batch_size, args.lr, args.weight_decay, args.epochs, args.optimizer) == \
        ("relic", "cifar10", 256, 3e-4, 1e-5, 100, "adam")
    assert (args.proj_out_dim, args.proj_hidden_dim, args.ema_momentum, args.alpha, args.max_temperature) == \
        (64, 512, 0.995, 1.0, 5.0)
    assert (args.lr_schedule, args.nest, args.ema_copy_until, args.ema_every) == ("none", "backbone", 1, 1)
    seed = parser.parse_args(["--dataset_name", "stl10", "-m", "resnet50", "-save_model_dir", "models",
                              "--num_epochs", "400", "-b", "128", "--learning_rate", "1e-3", "-wd", "1e-4",
                              "--log_every_n_steps", "400", "--gamma", "0.98", "--update_gamma_after_step", "3",
                              "--update_gamma_every_n_steps", "2", "--proj_out_dim", "128", "--fp16_precision"])
    assert (seed.dataset, seed.model, seed.output_dir, seed.epochs, seed.batch_size, seed.lr, seed.weight_decay) == \
        ("stl10", "resnet50", "models", 400, 128, 1e-3, 1e-4)
    assert (seed.log_every, seed.ema_momentum, seed.ema_copy_until, seed.ema_every, seed.proj_out_dim) == \
        (400, 0.98, 3, 2, 128)
    assert seed.fp16_precision and parser.parse_args(["-lr", "0.1", "--wd", "0.2"]).weight_decay == 0.2
    assert all(action.help for action in parser._actions)


@pytest.mark.parametrize("method", ["relic", "simclr", "byol"])
def test_sync_bn_synchronizes_every_batchnorm_of_the_model(method):
    # SyncBatchNorm runs on GPUs only, so this checks what --sync_bn builds: no BatchNorm left anywhere -- backbone,
    # projector, BYOL's predictor (which once stayed plain), the EMA target's copies
    from mrl.models.backbones import build_backbone
    from mrl.ssl.projectors import Projector

    args = train_ssl.get_args_parser().parse_args(["--method", method, "--proj_batchnorm", "on"])
    backbone = build_backbone("resnet18", 8)
    model = build_model(args, backbone, Projector(512, 32, 8, batchnorm=True), [8, 512], [1.0, 1.0],
                                  ema_schedule=[0.99] * 4, sync_bn=True)
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and set(norms) == {"SyncBatchNorm"}
    if method == "byol":
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.predictor.modules())
    if method != "simclr":
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.target.modules())
