"""evaluate.py end to end on real checkpoints: a supervised run trained here by train_supervised.py, and the same
backbone saved the way train_ssl.py saves its runs (kind "ssl", no heads)."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import DIGITS_FAST, run_script
from PIL import Image
from safetensors.torch import load_file, save_file
from wandb_history import history, records

import evaluate
from mrl import UserError
from mrl.batches.transforms import ImageTransform, build_transform
from mrl.data.sources import load_splits
from mrl.eval.features import extract, read_cache
from mrl.eval.retrieval_grid import evaluation_grid, split_thumbnails
from mrl.run_folder.final_model import load_model

# its module fixtures are built once: all of its tests run on one pytest-xdist worker (pytest.ini)
pytestmark = pytest.mark.xdist_group("test_evaluate")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A supervised MRL run (digits at 8 px, one epoch of 4 steps) and an SSL-format copy of its backbone."""
    tmp = tmp_path_factory.mktemp("eval")
    run_script("train_supervised.py", *DIGITS_FAST, "--epochs", 1, "--max_train_samples", 256, "--batch_size", 64,
               "--output_dir", tmp / "sup", tmp_path=tmp)
    ssl = tmp / "ssl"
    ssl.mkdir()
    weights = load_file(tmp / "sup" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith("backbone.")}, ssl / "model.safetensors")
    config = json.loads((tmp / "sup" / "config.json").read_text())
    config.update(kind="ssl", heads=None)
    config["data"]["augment"] = "ssl"  # train_ssl.py's two-view augmentation name: evaluation must not use it
    (ssl / "config.json").write_text(json.dumps(config))
    return tmp


@pytest.fixture(scope="module")
def first_run(checkpoints):
    """Both checkpoints in one table, at dims inside and outside the training list (24 is not a head), with the
    features extracted by two processes; on the whole training split (--max_train_samples 0: the run trained on 256
    of its images, which evaluate.py would otherwise keep to)."""
    out = checkpoints / "out1"
    result = run_script("evaluate.py", "--checkpoint", checkpoints / "sup", checkpoints / "ssl", "--labels", "MRL",
                        "SSL", "--dims", "8,24,512", "--shortlist", 50, "--num_workers", 0, "--batch_size", 64,
                        "--max_train_samples", 0,
                        "--output_dir", out, tmp_path=checkpoints, processes=2)
    return out, result, json.loads((out / "results.json").read_text())


def test_evaluates_supervised_and_ssl_checkpoints_end_to_end(checkpoints, first_run):
    out, result, results = first_run
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("extracted") == 6  # train, val and test of each checkpoint
    # one line per long stage, with its time, from the main process only (of the 2)
    for label in ("MRL", "SSL"):
        for split in ("train", "val", "test"):
            line = rf"^{label}: {split} features: extracted \d+ x 512 in [\d.]+ s \(\d+ images/s\)"
            assert len(re.findall(line, result.stdout, re.M)) == 1, (label, split)
        for stage in ("linear probe", "kNN and retrieval", r"PCA baseline \(fit, probe, kNN, retrieval\)",
                      "adaptive retrieval"):
            assert len(re.findall(rf"^{label}: {stage} at 3 dims: [\d.]+ s$", result.stdout, re.M)) == 1, stage
    assert results["dataset"]["dataset"] == "digits" and results["eval_split"] == "test"
    mrl, ssl = results["runs"]
    assert (mrl["label"], mrl["kind"], ssl["label"], ssl["kind"]) == ("MRL", "supervised", "SSL", "ssl")
    for run in (mrl, ssl):
        assert [r["dim"] for r in run["per_dim"]] == [8, 24, 512]
        for row in run["per_dim"]:
            for key in ("probe", "knn", "map@10", "precision@10", "map_mrl@10", "pca_probe", "pca_knn"):
                assert 0 <= row[key] <= 1, (key, row)
        # 10 classes: chance is 0.1; 6 runs of this setting (seeds 0-4, 1 and 2 threads) probed 0.94-0.98
        assert run["per_dim"][-1]["probe"] > 0.5
        assert run["adaptive_classification"]["probe"][-1]["expected_dim"] == 512
        # the probe's train subset (--probe_max_train_samples 100,000) holds the whole train split here
        assert run["n"]["probe_train"] == run["n"]["train"] > 200
        funnel = run["adaptive_retrieval"]
        assert [r["shortlist_dim"] for r in funnel] == [512, 8, 24] and funnel[0]["speedup"] == 1.0
    # the same backbone: identical features, so identical probe / kNN numbers with or without heads
    assert [r["knn"] for r in mrl["per_dim"]] == [r["knn"] for r in ssl["per_dim"]]
    # heads: reported at the trained dims only, equal to what the training script measured on the same test split
    trained = json.loads((checkpoints / "sup" / "metrics.json").read_text())
    expected = dict(zip(trained["dims"], trained["test"]["accuracy"]))
    assert mrl["per_dim"][0]["head"] == pytest.approx(expected[8], abs=0.003)
    assert mrl["per_dim"][2]["head"] == pytest.approx(expected[512], abs=0.003)
    assert "head" not in mrl["per_dim"][1] and all("head" not in r for r in ssl["per_dim"])
    assert mrl["adaptive_classification"]["heads"][0]["expected_dim"] == 8
    assert "heads" not in ssl["adaptive_classification"]
    # outputs: the markdown table, the protocols, and non-empty plots
    markdown = (out / "results.md").read_text()
    assert "| 512 | none (full search) |" in markdown  # adaptive retrieval's full-dim row has no shortlist
    assert "| run | dim | probe top-1 | kNN top-1 | mAP@10 | P@10 |" in markdown
    assert "| MRL | 24 |" in markdown and "| SSL | 512 |" in markdown and "cascade" in markdown
    assert set(results["protocols"]) >= {"probe", "knn", "retrieval", "pca", "head"}
    for name in ("accuracy_vs_dim", "knn_vs_dim", "map_at_10_vs_dim", "adaptive_classification",
                 "adaptive_retrieval", "pca_scatter_MRL", "pca_scatter_SSL"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name


def test_two_processes_extract_every_sample_once_in_order(checkpoints, first_run):
    """The features that two processes gathered (1437 train and 180 test images: neither a multiple of 2 x 64, so
    the last batches are padded) are exactly those of one process, row for row."""
    config = json.loads((checkpoints / "sup" / "config.json").read_text())
    data = config["data"]
    splits = load_splits("digits", seed=data["seed"], val_fraction=data["val_fraction"],
                         test_fraction=data["test_fraction"])
    cached = {p.name.split("-")[0]: dict(zip(("features", "labels"), read_cache(str(p)[:-len(".labels.npy")])))
              for p in (checkpoints / "sup" / "features").glob("*.labels.npy")}
    for name in ("train", "val", "test"):
        assert torch.equal(cached[name]["labels"], torch.tensor(getattr(splits, name)["label"]))
    splits.test.set_transform(ImageTransform(build_transform(data["augment"], data["image_size"], data["mean"],
                                                             data["std"], train=False)))
    backbone, _, _ = load_model(checkpoints / "sup")
    features, labels = extract(Accelerator(cpu=True), backbone, splits.test, batch_size=64)
    assert torch.equal(labels, cached["test"]["labels"])
    assert torch.allclose(features, cached["test"]["features"].float(), atol=1e-5, rtol=1e-3)  # cached as float16


def test_second_evaluation_reads_the_feature_cache(checkpoints, first_run, tmp_path):
    cache = sorted((checkpoints / "sup" / "features").glob("*.npy"))
    assert [p.name.split("-")[0] for p in cache] == ["test", "test", "train", "train", "val", "val"]
    mtimes = [p.stat().st_mtime_ns for p in cache]
    out = tmp_path / "out2"
    result = run_script("evaluate.py", "--checkpoint", checkpoints / "sup", "--dims", 8, 16, "--no-pca",
                        "--max_train_samples", 0, "--num_workers", 0, "--output_dir", out, tmp_path=tmp_path,
                        wandb=True)
    assert result.stdout.count("loaded cached features") == 3 and "extracted" not in result.stdout
    assert [p.stat().st_mtime_ns for p in cache] == mtimes
    assert sorted((checkpoints / "sup" / "features").glob("*.npy")) == cache  # other dims, same features
    results = json.loads((out / "results.json").read_text())
    first = json.loads((first_run[0] / "results.json").read_text())
    assert results["runs"][0]["per_dim"][0]["knn"] == first["runs"][0]["per_dim"][0]["knn"]
    # W&B (offline): the per-dim table and the plots on one run page
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    logged = set().union(*history(run_dir))
    assert {"per_dim/_type", "plots/accuracy_vs_dim/_type", "adaptive_classification/_type"} <= logged
    (wandb_file,) = run_dir.glob("run-*.wandb")
    summary = {item.key: json.loads(item.value_json) for record in records(wandb_file)
               if record.WhichOneof("record_type") == "summary" for item in record.summary.update}
    assert summary["sup/probe_d8"] == pytest.approx(results["runs"][0]["per_dim"][0]["probe"])
    # the retrieval grid, logged as an image: the picture evaluation_grid draws from the run's cached features, rows
    # at the evaluated dims (tests/test_retrieval_grid.py checks what such a picture shows, cell by cell)
    assert "plots/retrieval_grid/sup/_type" in logged
    data = json.loads((checkpoints / "sup" / "config.json").read_text())["data"]
    splits = load_splits("digits", seed=data["seed"], val_fraction=data["val_fraction"],
                         test_fraction=data["test_fraction"])
    cached = {p.name.split("-")[0]: read_cache(str(p)[:-len(".labels.npy")])
              for p in (checkpoints / "sup" / "features").glob("*.labels.npy")}
    expected = evaluation_grid(tmp_path / "expected.png", *cached["train"], *cached["test"], [8, 16],
                               split_thumbnails(splits.train), split_thumbnails(splits.test), splits.class_names,
                               title="sup: nearest train images by cosine on each prefix")
    drawn = np.asarray(Image.open(out / "retrieval_grid_sup.png"))
    assert drawn.shape[0] > drawn.shape[1] and np.array_equal(drawn, np.asarray(Image.open(expected)))


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_script("evaluate.py", "--checkpoint", tmp_path / "nope", tmp_path=tmp_path, check=False)
    assert result.returncode != 0
    expected = f"error: --checkpoint {tmp_path / 'nope'} does not exist (expected a folder written by a training " \
               "script)"
    assert result.stderr.strip().splitlines() == [expected]


def run_main(*args):
    evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in args]
                                                        + ["--report_to", "none", "--no-retrieval_grid"]))


def test_incomplete_or_foreign_checkpoints_are_refused(checkpoints, tmp_path):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(checkpoints / "sup" / "config.json", incomplete / "config.json")
    with pytest.raises(UserError, match="no model.safetensors"):
        run_main("--checkpoint", incomplete)
    os.remove(incomplete / "config.json")
    with pytest.raises(UserError, match="config.json is missing"):
        run_main("--checkpoint", incomplete)
    future = tmp_path / "future"
    shutil.copytree(checkpoints / "ssl", future)
    config = json.loads((future / "config.json").read_text())
    (future / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(UserError, match="format version 99"):
        run_main("--checkpoint", future)
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoints / "sup", truncated, ignore=shutil.ignore_patterns("features", "eval*"))
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])  # as by a copy cut short
    with pytest.raises(UserError, match="model.safetensors cannot be read .*: the file is damaged or incomplete"):
        run_main("--checkpoint", truncated)


def test_a_training_checkpoint_is_evaluated_with_its_runs_config(trained, tmp_path):
    # a mid-training checkpoint (step 14 of 44) of the session's run: the whole training model's weights
    run = trained[0] / "out"
    checkpoint = run / "checkpoints" / "step_00000014"
    result = run_script("evaluate.py", "--checkpoint", checkpoint, "--dims", 8, 512, "--no-pca", "--num_workers", 0,
                        "--feature_cache", "none", "--no-retrieval_grid", tmp_path=tmp_path)
    out = run / "eval_step_00000014"  # beside the checkpoint, which a newer one may replace
    results = json.loads((out / "results.json").read_text())
    assert results["runs"][0]["label"] == "out@step_00000014" and "evaluating dims [8, 512]" in result.stdout
    assert all(0.1 < r["head"] <= 1 and 0.1 < r["probe"] <= 1 for r in results["runs"][0]["per_dim"])
    # what was evaluated are the weights the training model had at step 14, not the final ones
    backbone, heads, _ = load_model(checkpoint)
    state, final = load_file(checkpoint / "model.safetensors"), load_file(run / "model.safetensors")
    key = "net.layer1.0.conv1.weight"
    torch.testing.assert_close(backbone.state_dict()[key], state["backbone." + key])
    assert not torch.equal(state["backbone." + key], final["backbone." + key])
    for name, value in heads.state_dict().items():
        torch.testing.assert_close(value, state["heads." + name])


def test_dims_beyond_the_embedding_are_refused(checkpoints):
    with pytest.raises(UserError, match=r"--dims must lie in 1\.\.512"):
        run_main("--checkpoint", checkpoints / "ssl", "--dims", "8,1024")


def test_heads_on_a_dataset_with_other_classes_are_refused(checkpoints, tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):  # a real image folder with two classes
        (tmp_path / "pets" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (8, 8), (20 * i, 100, 0)).save(tmp_path / "pets" / name / f"{i}.png")
    with pytest.raises(UserError, match="heads for 10 classes .* but the dataset has 2"):
        run_main("--checkpoint", checkpoints / "sup", "--dataset", "custom", "--dataset_path", tmp_path / "pets")


def split_flags(**flags):
    return {"dataset": "digits", "dataset_path": None, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1,
            "min_image_size": 0, "max_train_samples": None, "max_eval_samples": None, **flags}


def trained_indices(seed, max_train_samples):
    """The rows a digits run trained on, as train_supervised.py splits them."""
    return set(load_splits("digits", seed=seed, max_train_samples=max_train_samples).train["index"])


def test_runs_with_other_seeds_are_evaluated_only_on_images_none_of_them_trained_on(checkpoints):
    # run a: the `checkpoints` run (seed 0, 256 training images); run b: seed 1 on the whole train split, saved by
    # the previous version of config.json (no split record: its settings are read from "args")
    args = evaluate.get_args_parser().parse_args(["--checkpoint", "a", "b"])
    record_a = json.loads((checkpoints / "sup" / "config.json").read_text())["data"]["splits"]
    assert {k: record_a[k] for k in ("seed", "min_image_size", "max_train_samples")} == \
        {"seed": 0, "min_image_size": 0, "max_train_samples": 256}
    legacy_b = {"data": {"dataset": "digits", "dataset_path": None, "seed": 1, "val_fraction": 0.1,
                         "test_fraction": 0.1}, "args": {"min_image_size": None, "max_train_samples": None}}
    records = [record_a, evaluate.split_record(legacy_b)]
    data = evaluate.resolve_data(args, records)
    splits = load_splits(data["dataset"], seed=data["seed"], val_fraction=data["val_fraction"],
                         test_fraction=data["test_fraction"], min_image_size=data["min_image_size"])
    before = len(splits.test)
    dropped = evaluate.exclude_trained_images(splits, records, ["a", "b"], log=print)
    kept = set(splits.test["index"])
    assert dropped > 100 and len(kept) == before - dropped > 0  # seed 1 trains on most of seed 0's test images
    assert not kept & trained_indices(0, 256) and not kept & trained_indices(1, None)
    # with the same settings nothing is dropped; a source's own test split is never filtered
    assert evaluate.exclude_trained_images(load_splits("digits"), [record_a, record_a], ["a", "c"], print) == 0


def test_a_run_is_evaluated_on_its_own_splits_whatever_filter_it_trained_with(checkpoints):
    args = evaluate.get_args_parser().parse_args(["--checkpoint", "a"])
    assert evaluate.resolve_data(args, [split_flags(min_image_size=7, seed=5)])["min_image_size"] == 7
    legacy = {"data": {"dataset": "cats_vs_dogs", "dataset_path": "x", "seed": 0}, "args": {"min_image_size": None}}
    assert evaluate.split_record(legacy)["min_image_size"] == 100  # the preset's, as the run used
    args = evaluate.get_args_parser().parse_args(["--checkpoint", "a", "--min_image_size", "3"])
    assert evaluate.resolve_data(args, [split_flags(min_image_size=7)])["min_image_size"] == 3


def test_two_runs_evaluated_together_from_the_command_line(checkpoints, tmp_path):
    run_script("train_supervised.py", *DIGITS_FAST, "--epochs", 1, "--max_train_samples", 128, "--batch_size", 64,
               "--seed", 1, "--output_dir", tmp_path / "seed1", tmp_path=tmp_path)
    result = run_script("evaluate.py", "--checkpoint", checkpoints / "sup", tmp_path / "seed1", "--dims", 8, 512,
                        "--no-pca", "--no-retrieval_grid", "--num_workers", 0, "--output_dir", tmp_path / "cmp",
                        tmp_path=tmp_path)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    test_a = set(load_splits("digits", seed=0).test["index"])
    expected = len(test_a - trained_indices(1, 128))
    assert "the runs' splits differ (--seed: sup 0, seed1 1)" in result.stdout
    assert all(run["n"]["eval"] == expected for run in results["runs"]) and expected < len(test_a)
    assert results["dataset"]["excluded_trained_images"] == len(test_a) - expected
