"""mrl.pretrained, mrl.train.publish and mrl.hub.model_card on the digits run the training script wrote (the session's
`trained` run): loading, bit-identical save/load, encoding at every prefix, classifying with the heads, the model
card, and the Hub push up to the network (the Hub is unreachable here, and the tests point it at a closed port
anyway)."""

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from huggingface_hub import ModelCard, constants
from PIL import Image
from safetensors.torch import load_file, save_file

import datasets
import evaluate
import train_ssl
import train_supervised
from mrl import UserError
from mrl.batches.transforms import Collate, ImageTransform, eval_transform
from mrl.data.sources import load_splits
from mrl.hub.model_card import update_card_with_evaluation
from mrl.models.backbones import build_backbone
from mrl.pretrained import MatryoshkaEncoder
from mrl.run_folder.final_model import load_model
from mrl.train.checkpoint import save_checkpoint
from mrl.train.publish import checkpoint_pusher, publish_run
from mrl.train.run import resolve_run_args
from mrl.utils import script

# its module fixtures are built once: all of its tests run on one pytest-xdist worker (pytest.ini)
pytestmark = pytest.mark.xdist_group("test_pretrained")

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: connection refused at once


@pytest.fixture(scope="module")
def run(trained):
    tmp, _ = trained
    return tmp / "out"


@pytest.fixture(scope="module")
def model(run):
    return MatryoshkaEncoder.from_pretrained(run, device="cpu")


@pytest.fixture(scope="module")
def test_split(run):
    data = json.loads((run / "config.json").read_text())["data"]
    return load_splits("digits", seed=data["seed"], val_fraction=data["val_fraction"],
                       test_fraction=data["test_fraction"]).test


@pytest.fixture
def unreachable_hub(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")


def copy_run(run, target):
    """The run folder without its checkpoints (the tests that write into a run get their own copy)."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "features", "eval", "embeddings"))
    return target


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_writes_a_model_card_with_hub_metadata_table_plot_and_command(run):
    card = ModelCard.load(run / "README.md")
    metrics = json.loads((run / "metrics.json").read_text())
    assert card.data.library_name == "mrl" and card.data.pipeline_tag == "image-feature-extraction"
    assert {"matryoshka", "image-feature-extraction", "resnet18", "supervised", "digits"} <= set(card.data.tags)
    assert card.data.metrics == ["accuracy"]
    # model-index: every head's test accuracy, as metrics.json has it
    assert [(r.metric_name, r.metric_value) for r in card.data.eval_results] == [
        (f"head top-1, d={d}", round(a, 4)) for d, a in zip(metrics["dims"], metrics["test"]["accuracy"])]
    assert {r.dataset_name for r in card.data.eval_results} == {"digits"}
    text = card.text
    for d, val, test in zip(metrics["dims"], metrics["val"]["accuracy"], metrics["test"]["accuracy"]):
        assert f"| {d} | {val:.4f} | {test:.4f} |" in text
    assert "![accuracy against embedding dim](accuracy_vs_dim.png)" in text and (run / "accuracy_vs_dim.png").is_file()
    # the exact command the session fixture ran (conftest.trained)
    assert ("train_supervised.py --dataset digits --image_size 8 --batch_size 32 --grad_accum_steps 1 --lr 2e-3 "
            "--num_workers 0 --epochs 2 --grad_accum_steps 2 --checkpointing_steps 7 --checkpoints_total_limit 10 "
            f"--log_every 1 --output_dir {run}") in text
    assert 'MatryoshkaEncoder.from_pretrained("out")' in text and "model.classify(images, dim=8)" in text


def test_save_pretrained_round_trip_is_bit_identical_to_the_trained_backbone(run, model, test_split, tmp_path):
    # The backbone as training saved it, rebuilt here without mrl.pretrained: the reference embeddings.
    config = json.loads((run / "config.json").read_text())
    backbone = build_backbone("resnet18", 8, config["model"]["cifar_stem"])
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in load_file(run / "model.safetensors").items()
                              if k.startswith("backbone.")})
    transformed = test_split.with_transform(ImageTransform(eval_transform(config)))
    batch = Collate()([transformed[i] for i in range(len(transformed))])
    with torch.no_grad():
        reference = backbone.eval()(batch["pixel_values"])

    model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["README.md", "accuracy_vs_dim.png", "config.json",
                                                      "metrics.json", "model.safetensors", "pca_val.png"]
    original, saved = load_file(run / "model.safetensors"), load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config
    assert (tmp_path / "saved" / "README.md").read_text() == (run / "README.md").read_text()

    reloaded = MatryoshkaEncoder.from_pretrained(tmp_path / "saved", device="cpu")
    embeddings = reloaded.encode(test_split, normalize=False, batch_size=len(test_split))
    assert torch.equal(embeddings, reference)
    load_model(tmp_path / "saved")  # evaluate.py reads a saved model like any run folder


def test_encode_at_every_dim_is_the_renormalized_prefix_of_one_forward_pass(model, test_split):
    images = test_split.select(range(40))
    full = model.encode(images, normalize=False)
    assert full.shape == (40, 512) and full.dtype == torch.float32
    prefixes = model.encode(images, dim=list(range(1, 513)))
    assert sorted(prefixes) == list(range(1, 513))
    for d, z in prefixes.items():
        torch.testing.assert_close(z, F.normalize(full[:, :d], dim=1), rtol=0, atol=1e-6)
        # unit rows, except where the prefix is all zeros (a few dims after the final ReLU can be)
        torch.testing.assert_close(z.norm(dim=1), (full[:, :d].abs().sum(1) > 0).float(), rtol=0, atol=1e-5)
    assert (prefixes[512].norm(dim=1) - 1).abs().max() < 1e-5
    assert torch.equal(model.encode(images, dim=16), prefixes[16])
    # the other input kinds give the same embeddings: PIL images, a folder of image files, a tensor of pixels
    cells = images.cast_column("image", datasets.Image(decode=False))["image"]
    pil = [Image.open(io.BytesIO(cell["bytes"])) for cell in cells]
    torch.testing.assert_close(model.encode(pil, dim=64), prefixes[64], rtol=0, atol=1e-6)
    pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
                          for im in pil])  # uint8 (n, 3, 8, 8), already the model's size
    torch.testing.assert_close(model.encode(pixels, dim=64), prefixes[64], rtol=0, atol=1e-5)
    with pytest.raises(UserError, match=r"dim must lie in 1\.\.512"):
        model.encode(pil, dim=513)


def test_classify_agrees_with_the_head_accuracy_in_metrics_json(run, model, test_split):
    metrics = json.loads((run / "metrics.json").read_text())
    predictions = model.classify(test_split, dim=model.dims)
    labels = torch.tensor(test_split["label"])
    accuracy = [(predictions[d] == labels).float().mean().item() for d in metrics["dims"]]
    assert accuracy == pytest.approx(metrics["test"]["accuracy"], abs=1e-6)
    assert accuracy[-1] > 0.5  # chance: 0.1; 16 runs of this setting ended at 0.77-0.96 (benchmarks/outcome_spread.py)
    probs = model.classify(test_split.select(range(5)), dim=8, return_probs=True)
    assert probs.shape == (5, 10) and torch.allclose(probs.sum(1), torch.ones(5))
    assert model.class_names == [str(i) for i in range(10)]
    with pytest.raises(UserError, match="no head at dim 24"):
        model.classify(test_split, dim=24)


def test_ssl_run_keeps_its_projector_and_has_no_heads(run, tmp_path):
    ssl = tmp_path / "ssl"
    ssl.mkdir()
    weights = {k: v for k, v in load_file(run / "model.safetensors").items() if k.startswith("backbone.")}
    projector = {"projector.fc1.weight": torch.randn(512, 512), "projector.fc2.weight": torch.randn(64, 512)}
    save_file({**weights, **projector}, ssl / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((run / "config.json").read_text())
    config.update(kind="ssl", heads=None, ssl={"method": "relic", "nest": "backbone", "dims": [8, 64, 512]})
    config["data"]["augment"] = "ssl"
    (ssl / "config.json").write_text(json.dumps(config))
    model = MatryoshkaEncoder.from_pretrained(ssl, device="cpu")
    assert model.dims == [8, 64, 512] and model.class_names is None
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in {**weights, **projector}.items()) and len(saved) == len(
        weights) + 2
    card = ModelCard.load(tmp_path / "saved" / "README.md")
    assert "self-supervised" in card.data.tags and "relic" in card.data.tags and "classify" not in card.text
    with pytest.raises(UserError, match="no classification heads"):
        model.classify(torch.zeros(1, 3, 8, 8))


def test_not_a_run_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json is missing"):
        MatryoshkaEncoder.from_pretrained(tmp_path / "empty")


def test_push_uploads_the_folder_save_pretrained_writes(run, model, monkeypatch, tmp_path):
    """Everything up to the network: the repo it creates, the files and card it uploads. Only the HTTP calls are
    replaced."""
    calls = {}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        calls["create"] = (repo_id, private, exist_ok)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, digests(folder_path), (folder_path / "README.md").read_text(), kwargs)
        return "https://huggingface.co/someone/mrl-digits/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("mrl.utils.hub_access.hub_unreachable", lambda: None)
    url = model.push_to_hub("someone/mrl-digits", private=True, commit_message="End of training")
    assert url.endswith("/commit/0") and calls["create"] == ("someone/mrl-digits", True, True)
    repo_id, uploaded, card, kwargs = calls["upload"]
    model.save_pretrained(tmp_path / "saved")
    assert repo_id == "someone/mrl-digits" and uploaded == digests(tmp_path / "saved")
    assert set(uploaded) == {"README.md", "accuracy_vs_dim.png", "config.json", "metrics.json", "model.safetensors",
                             "pca_val.png"}
    assert uploaded["model.safetensors"] == digests(run)["model.safetensors"]  # the trained weights, bit for bit
    assert card == (run / "README.md").read_text() and kwargs["commit_message"] == "End of training"


def test_unreachable_hub_is_one_line_and_the_run_stays_intact(run, tmp_path, unreachable_hub):
    copy = copy_run(run, tmp_path / "run")
    before = digests(copy)
    args = argparse.Namespace(output_dir=str(copy), push_to_hub=True, hub_model_id="someone/mrl-digits",
                              hub_private=False, hub_push_checkpoints=False)
    with pytest.raises(SystemExit) as exit_:  # script.run: what the training script's last line does with it
        script.run(lambda a: publish_run(a, Accelerator(cpu=True), "train_supervised.py"), args)
    message = exit_.value.code
    assert message.startswith("error: cannot push to someone/mrl-digits: cannot reach the Hugging Face Hub at "
                              "127.0.0.1") and "\n" not in message
    assert f"the run is saved in {copy}" in message and "push_to_hub('someone/mrl-digits')" in message
    after = digests(copy)
    assert after.keys() == before.keys()
    assert all(after[f] == before[f] for f in before if f != "README.md")  # the card is rewritten, the run is not
    assert "MatryoshkaEncoder.from_pretrained(\"someone/mrl-digits\")" in (copy / "README.md").read_text()
    # loading a Hub id fails in seconds too, in one line (not after half a minute of retries)
    with pytest.raises(UserError, match="someone/missing is not a local folder, and cannot reach the Hugging Face "
                                        "Hub at 127.0.0.1 .* not in the local Hugging Face cache"):
        MatryoshkaEncoder.from_pretrained("someone/missing")


def test_hub_flags_are_checked_before_training(tmp_path, monkeypatch):
    for script in (train_supervised, train_ssl):
        parse = lambda *argv: script.get_args_parser().parse_args(  # noqa: E731
            ["--dataset", "digits", "--output_dir", str(tmp_path / "out"), *argv])
        args = parse("--push_to_hub", "--hub_model_id", "someone/x", "--hub_private")
        assert (args.push_to_hub, args.hub_model_id, args.hub_private, args.hub_push_checkpoints) == (
            True, "someone/x", True, False)
        with pytest.raises(UserError, match="--hub_model_id, --hub_private need --push_to_hub"):
            resolve_run_args(parse("--hub_model_id", "someone/x", "--hub_private"), "x")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # not logged in
    with pytest.raises(UserError, match="--push_to_hub needs a Hugging Face token"):
        resolve_run_args(parse("--push_to_hub"), "x")


def test_each_checkpoint_is_pushed_in_the_background_and_a_failure_does_not_stop_training(tmp_path, monkeypatch):
    uploads = []

    def upload_folder(self, **kwargs):  # run_as_future=True returns a Future
        uploads.append(kwargs)
        future = concurrent.futures.Future()
        future.set_result("https://huggingface.co/someone/x/commit/0")
        return future

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("mrl.utils.hub_access.hub_unreachable", lambda: None)
    output_dir = str(tmp_path / "out")
    args = argparse.Namespace(output_dir=output_dir, hub_model_id="someone/x", hub_private=False,
                              hub_push_checkpoints=True)
    pusher = checkpoint_pusher(args)
    accelerator = Accelerator(cpu=True)
    first = save_checkpoint(accelerator, output_dir, 7, keep=2, after_save=pusher)
    (upload,) = uploads
    assert upload["repo_id"] == "someone/x" and upload["run_as_future"]
    assert upload["folder_path"] == os.path.join(output_dir, "checkpoints")
    assert upload["path_in_repo"] == "checkpoints"
    # only the new checkpoint is sent, and the Hub's older ones are deleted in the same commit
    assert upload["allow_patterns"] == [f"{os.path.basename(first)}/*"] and upload["delete_patterns"] == ["*"]
    monkeypatch.setattr("mrl.utils.hub_access.hub_unreachable", lambda: "cannot reach the Hugging Face Hub at x")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        second = save_checkpoint(accelerator, output_dir, 14, keep=2, after_save=pusher)
    assert os.path.isdir(second) and len(uploads) == 1
    assert stderr.getvalue() == ("warning: checkpoint step_00000014 not pushed: cannot reach the Hugging Face Hub "
                                 "at x\n")


def test_evaluate_writes_its_per_dim_results_into_the_card(run, tmp_path):
    copy = copy_run(run, tmp_path / "run")
    args = evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(copy), "--dims", "8,512", "--no-pca", "--max_train_samples", "300", "--max_eval_samples",
         "90", "--probe_l2", "1e-3", "--probe_max_iter", "30", "--num_workers", "0", "--shortlist", "20",
         "--report_to", "none", "--update_model_card", "--no-retrieval_grid"])
    evaluate.main(args)
    results = json.loads((copy / "eval" / "results.json").read_text())["runs"][0]["per_dim"]
    card = ModelCard.load(copy / "README.md")
    entries = {r.metric_name: r.metric_value for r in card.data.eval_results}
    for row in results:
        assert entries[f"linear probe top-1, d={row['dim']}"] == round(row["probe"], 4)
        assert entries[f"kNN top-1, d={row['dim']}"] == round(row["knn"], 4)
        assert f"| run | {row['dim']} | {row['probe']:.4f} | {row['knn']:.4f} |" in card.text
    assert "head top-1, d=8" in entries  # training's entries stay
    assert "![evaluation: accuracy against dim](eval/accuracy_vs_dim.png)" in card.text
    assert "Not evaluated offline yet" not in card.text and "## Training" in card.text
    # a second evaluation replaces the first one's results instead of adding to them
    update_card_with_evaluation(copy, (copy / "eval" / "results.md").read_text(), results, "test")
    again = ModelCard.load(copy / "README.md")
    assert again.text.count("evaluate.py results: begin") == 1
    assert len(again.data.eval_results) == len(card.data.eval_results)
