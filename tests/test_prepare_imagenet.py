"""mrl.data.prepare_imagenet on the tiny ImageNet of imagenet_fixture: the prepared shards hold the folder's images
(within the cap, as plain JPEGs) with its labels, stream, resume and evaluate as the folder does, train; a killed
preparation finishes to the very bytes of an uninterrupted one; bad input is one line."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import ROOT, run_script
from PIL import Image, ImageOps

from mrl import UserError
from mrl.batches.streams import StreamLoader
from mrl.batches.transforms import ImageTransform, build_transform
from mrl.data.prepare_imagenet import prepare, shard_sizes
from mrl.data.shards import ShardedStream
from mrl.data.sources import load_splits

CAP = 256  # below most of the fixture's sizes (40-500 px): both copied and re-encoded images
HALF = (0.5, 0.5, 0.5)


def quiet(line):
    pass


@pytest.fixture(scope="module")
def prepared(tiny_imagenet, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepared") / "out"
    info = prepare(str(tiny_imagenet.folder), str(output), max_side=CAP, shard_size=5, log=quiet)
    return output, info


def members(folder):
    """{file name: sha256} of every file a preparation wrote (the shards and _info.json)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def shard_samples(folder):
    """{key: (stored bytes, label)} over every shard of a prepared folder."""
    samples = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, suffix = member.name.split(".")
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return {key: (s["jpg"], int(s["cls"])) for key, s in samples.items()}


def test_prepared_shards_hold_the_folders_readable_images_within_the_cap(tiny_imagenet, prepared):
    output, info = prepared
    sources = {p.stem: p for p in tiny_imagenet.folder.glob("*/*/*.JPEG")}
    samples = shard_samples(output)
    assert len(samples) == 27 and tiny_imagenet.truncated[:-len(".JPEG")] not in samples  # 28 images, 1 unreadable
    copied = 0
    for key, (data, label) in samples.items():
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode in ("RGB", "L") and max(image.size) <= CAP, key
        assert label == tiny_imagenet.labels[tiny_imagenet.synsets.index(key.split("_")[0])]
        source = sources[key].read_bytes()
        copied += data == source
        if data != source:  # re-encoded: the same picture (EXIF rotation applied), scaled to the cap
            original = ImageOps.exif_transpose(Image.open(sources[key])).convert("RGB")
            expected = original.resize(image.size, Image.Resampling.LANCZOS)
            # measured: at most 3.5 levels mean (JPEG at quality 90 after DCT-scaled decoding); a wrong turn or
            # crop differs by tens of levels
            assert np.abs(np.asarray(image.convert("RGB"), float) - np.asarray(expected, float)).mean() < 10, key
    counts = info["counts"]
    assert copied == counts["copied"] > 0 and counts["reencoded"] == 27 - copied and counts["unreadable"] == 1
    assert info["unreadable"] == [str(tiny_imagenet.folder / "train" / tiny_imagenet.synsets[0] /
                                      tiny_imagenet.truncated)]
    assert json.loads((output / "_info.json").read_text()) == info


def test_the_parquet_layout_prepares_to_the_same_shards(tiny_imagenet, prepared, tmp_path):
    prepare(str(tiny_imagenet.parquet), str(tmp_path), max_side=CAP, shard_size=5, log=quiet)
    ours, folders = members(tmp_path), members(prepared[0])
    assert ours.pop("_info.json") != folders.pop("_info.json")  # it names its own source
    assert ours == folders


def eval_labels(split):
    """The labels of a split's readable images, as its evaluation batches (32 px crops) give them."""
    split.set_transform(ImageTransform(build_transform("resized_crop_flip", 32, HALF, HALF, train=False)))
    loader = StreamLoader(split, 4, train=False, log=quiet) if isinstance(split, ShardedStream) else None
    batches = list(loader) if loader else [[split[i] for i in range(len(split))]]
    labels = Counter()
    for batch in batches:
        pairs = zip(batch["labels"], batch["pixel_values"]) if loader else \
            ((row["label"], row["pixel_values"]) for row in batch)
        labels.update(int(y) for y, p in pairs if int(y) >= 0 and p is not None)
    return labels


def test_prepared_shards_evaluate_and_resume_as_the_folder_does(tiny_imagenet, prepared):
    folder, shards = load_splits("imagenet", str(tiny_imagenet.folder)), load_splits("imagenet", str(prepared[0]))
    assert isinstance(shards.train, ShardedStream) and shards.class_names == folder.class_names
    assert (len(shards.train), len(shards.val)) == (19, 8) and shards.train.counts == [5, 5, 5, 4]
    assert eval_labels(shards.val) == eval_labels(folder.val)  # every validation image once, the same labels
    # the training labels: the folder's readable images' (its unreadable one is the one left out)
    readable = Counter(label for cell, label in zip(folder.train["image"], folder.train["label"])
                       if not cell["path"].endswith(tiny_imagenet.truncated))
    assert Counter(shards.train.row(example)[1] for example in shards.train.dataset) == readable
    stream = shards.train
    stream.set_transform(ImageTransform(build_transform("resized_crop_flip", 16, HALF, HALF, train=True), seed=3))
    loader = StreamLoader(stream, 4, train=True, seed=1, num_workers=2, log=quiet)
    full, resumed = list(loader.batches(1)), list(loader.batches(1, start=2))
    assert len(full) == 4 and len(resumed) == 2 and sum(int(b["skipped"]) for b in full) == 0
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def test_train_supervised_trains_and_evaluates_on_prepared_shards(prepared, tmp_path):
    result = run_script("train_supervised.py", "--dataset", "imagenet", "--dataset_path", prepared[0],
                        "--model", "resnet18", "--image_size", 16, "--min_res", 16, "--max_res", 16, "--epochs", 1,
                        "--batch_size", 4, "--num_workers", 0, "--output_dir", tmp_path / "run", tmp_path=tmp_path)
    assert "19 samples in 4 shards: 4 batches of 4" in result.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["val"]["n"] == 8 and np.isfinite(metrics["val"]["loss"]).all()


def test_a_killed_preparation_finishes_with_the_bytes_of_an_uninterrupted_one(tiny_imagenet, prepared, tmp_path):
    output = shutil.copytree(prepared[0], tmp_path / "out")
    # what a kill leaves: a shard half written, one written but not renamed (record saved), one not started, no
    # _info.json
    (output / "imagenet-train-0002.tar").rename(output / "imagenet-train-0002.tar.partial")
    partial = output / "imagenet-train-0002.tar.partial"
    partial.write_bytes(partial.read_bytes()[:3000])
    (output / "imagenet-validation-0001.tar").rename(output / "imagenet-validation-0001.tar.partial")
    (output / "imagenet-train-0000.tar").unlink()
    (output / "_prepare" / "imagenet-train-0000.tar.json").unlink()
    (output / "_info.json").unlink()
    lines = []
    prepare(str(tiny_imagenet.folder), str(output), max_side=CAP, shard_size=5, log=lines.append)
    assert "(3 shards written by an earlier run)" in lines[0]
    assert members(output) == members(prepared[0]) and not list(output.glob("*.partial"))


def test_a_preparation_killed_for_real_resumes_to_the_same_shards(tiny_imagenet, tmp_path):
    flags = ["--max_side", CAP, "--shard_size", 1, "--num_workers", 2]  # 28 shards, each fsynced: time to be killed
    command = [sys.executable, "-m", "mrl.data.prepare_imagenet", "--source", tiny_imagenet.folder, *flags]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = subprocess.Popen([str(a) for a in command + ["--output", killed]], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(killed.glob("*.tar")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # the process and its workers, as a scheduler kills a job
    process.wait()
    assert list(killed.glob("*.tar"))  # killed after its first shard (where exactly varies from run to run)
    subprocess.run([str(a) for a in command + ["--output", killed]], cwd=ROOT, check=True, capture_output=True)
    prepare(str(tiny_imagenet.folder), str(whole), max_side=CAP, shard_size=1, log=quiet)  # in one process: the same
    # the truncated image's shard is written empty
    assert members(killed) == members(whole) and len(list(whole.glob("*.tar"))) == 20 + 8


def test_bad_input_is_one_line(tiny_imagenet, tmp_path, capsys):
    folder = shutil.copytree(tiny_imagenet.folder, tmp_path / "folder")
    empty = folder / "train" / "n01491361"
    empty.mkdir()
    for source, match in ((folder, "class folder .*n01491361 is empty"),):
        with pytest.raises(UserError, match=match) as error:
            prepare(str(source), str(tmp_path / "a"), log=quiet)
        assert "\n" not in str(error.value)
    empty.rmdir()
    (folder / "train" / "cats").mkdir()
    result = subprocess.run([sys.executable, "-m", "mrl.data.prepare_imagenet", "--source", str(folder), "--output",
                             str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "cats is not an ImageNet class folder" in result.stderr
    (folder / "train" / "cats").rmdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    for output, settings, match in ((tmp_path / "c", {}, r"holds other files \(notes.txt\)"),
                                    (tmp_path / "d", {"quality": 0}, "JPEG quality between 1 and 100")):
        with pytest.raises(UserError, match=match) as error:
            prepare(str(folder), str(output), **settings, log=quiet)
        assert "\n" not in str(error.value)
    capsys.readouterr()
    prepare(str(folder), str(tmp_path / "e"), max_side=CAP, shard_size=5, log=quiet)
    with pytest.raises(UserError, match="holds a preparation with another max_side, quality") as error:
        prepare(str(folder), str(tmp_path / "e"), max_side=CAP + 1, quality=80, shard_size=5, log=quiet)
    assert "\n" not in str(error.value)
    # the truncated file: one line, once; the run goes on
    lines = [line for line in capsys.readouterr().out.splitlines() if tiny_imagenet.truncated in line]
    assert len(lines) == 1 and "cannot read" in lines[0] and "left out" in lines[0]


def test_shards_divide_over_8_to_64_processes():
    assert len(shard_sizes(1_281_167, 1252)) == 1024 and len(shard_sizes(50_000, 1252)) == 64
    assert max(shard_sizes(1_281_167, 1252)) <= 1252 and sum(shard_sizes(1_281_167, 1252)) == 1_281_167
    assert shard_sizes(20, 5) == [5] * 4 and shard_sizes(8, 5) == [4, 4] and shard_sizes(3, 1) == [1, 1, 1]
