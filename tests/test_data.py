import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from mrl import UserError
from mrl.batches.decode import open_image
from mrl.batches.transforms import (
    Collate,
    FillUnreadable,
    ImageTransform,
    attach_transforms,
    build_transform,
    sample_seed,
)
from mrl.data.presets import PRESETS
from mrl.data.sources import load_splits


def test_digits_splits_are_stratified_seeded_and_disjoint():
    splits = load_splits("digits", seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1437, 180, 180)
    assert splits.class_names == [str(i) for i in range(10)]
    everything = Counter([*splits.train["label"], *splits.val["label"], *splits.test["label"]])
    for split in (splits.val, splits.test):  # each class in proportion to its share of the data, within one image
        counts = Counter(split["label"])
        assert all(abs(counts[c] - everything[c] * len(split) / 1797) <= 1 for c in range(10))
    ids = [set(s["index"]) for s in (splits.train, splits.val, splits.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert list(load_splits("digits", seed=0).val["index"]) == list(splits.val["index"])
    assert list(load_splits("digits", seed=1).val["index"]) != list(splits.val["index"])


def test_blog_split_without_test_set():
    splits = load_splits("digits", test_fraction=0.0)
    assert splits.test is None and (len(splits.train), len(splits.val)) == (1617, 180)


def test_cifar10_copy_in_hub_layout(cifar10_path):
    splits = load_splits("cifar10", cifar10_path, max_train_samples=200, max_eval_samples=100)
    assert splits.class_names[:3] == ["airplane", "automobile", "bird"]
    assert splits.train.column_names == ["image", "label", "index"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (200, 100, 100)
    preset = PRESETS["cifar10"]
    attach_transforms(splits, preset.augment, 32, preset.mean, preset.std, seed=0)
    x = splits.test[0]["pixel_values"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert -3 < x.min() < 0 < x.max() < 3  # normalized with the CIFAR statistics


def test_augmentation_is_seeded_per_sample_and_epoch():
    splits = load_splits("digits", max_train_samples=8)
    transform = attach_transforms(splits, "crop", 16, (0.5,) * 3, (0.5,) * 3, seed=3)
    first = splits.train[:4]["pixel_values"]
    again = [splits.train[i]["pixel_values"] for i in (3, 2, 1, 0)][::-1]  # other order, one at a time
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first, splits.train[4:8]["pixel_values"]))
    transform.epoch = 1
    assert any(not torch.equal(a, b) for a, b in zip(first, splits.train[:4]["pixel_values"]))


@pytest.mark.parametrize("seed", [18447, 2**32 - 1])
def test_every_32_bit_seed_splits_and_augments(seed):
    # --seed 18447 and larger used to overflow the per-sample augmentation seed at the first image
    splits = load_splits("digits", seed=seed, max_train_samples=8)
    attach_transforms(splits, "crop", 16, (0.5,) * 3, (0.5,) * 3, seed=seed)
    first = splits.train[:4]["pixel_values"]
    torch.testing.assert_close(first, splits.train[:4]["pixel_values"])
    assert sample_seed(seed, 0, 3) != sample_seed(seed, 0, 4) != sample_seed(seed, 1, 4)
    assert sample_seed(7, 2, 11) == (7 * 1_000_003 + 2) * 1_000_000_007 + 11  # earlier runs' seeds are kept


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image.mode != "CMYK" else "JPEG")
    return buffer.getvalue()


def test_every_image_mode_becomes_rgb_and_corrupt_files_are_none():
    modes = [Image.new("L", (5, 4)), Image.new("RGBA", (5, 4)), Image.new("CMYK", (5, 4)),
             Image.new("P", (5, 4)), Image.new("I;16", (5, 4))]
    for image in modes:
        opened = open_image({"bytes": _png(image), "path": None})
        assert opened.mode == "RGB" and opened.size == (5, 4), image.mode
    assert open_image({"bytes": b"not an image", "path": None}) is None
    assert open_image({"bytes": None, "path": "/nonexistent.png"}) is None


def test_unreadable_images_are_replaced_for_training_and_masked_for_evaluation_keeping_every_batch_shape():
    transform = ImageTransform(build_transform("crop", 8, (0.5,) * 3, (0.5,) * 3, train=False))
    cells = [{"bytes": _png(Image.new("L", (8, 8), color=40 * i)), "path": None} for i in range(6)]
    cells[1] = {"bytes": b"junk", "path": None}
    cells[4] = cells[5] = {"bytes": None, "path": "/x/bad.png"}
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64"),
                                  "index": datasets.Value("int64")})
    split = datasets.Dataset.from_dict({"image": cells, "label": [10, 11, 12, 13, 14, 15],
                                        "index": [0, 1, 2, 3, 4, 5]}, features=features)
    split.set_transform(transform)
    # training: each unreadable sample is the next readable one after it (wrapping around), counted and named
    train = Collate()(FillUnreadable(split).__getitems__([1, 0, 5, 4]))
    assert train["pixel_values"].shape == (4, 3, 8, 8) and train["labels"].tolist() == [12, 10, 10, 10]
    assert torch.equal(train["pixel_values"][0], split[2]["pixel_values"])
    assert train["skipped"] == 3 and train["unreadable"] == ["row 1", "/x/bad.png", "/x/bad.png"]
    # a missing cell (None: a row without an image) is named by its row like a corrupt one
    assert transform({"image": [None], "label": [0], "index": [9]})["unreadable"] == ["row 9"]
    # evaluation: zero images labelled -1, also in a batch with no readable image
    evaluation = Collate()(FillUnreadable(split, evaluation=True).__getitems__([4, 5, 1]))
    assert evaluation["pixel_values"].shape == (3, 3, 8, 8) and evaluation["labels"].tolist() == [-1, -1, -1]
    assert evaluation["pixel_values"].abs().sum() == 0 and evaluation["skipped"] == 3
    # nothing readable in the whole split: an empty batch, which the scripts turn into one line
    broken = datasets.Dataset.from_dict({"image": [cells[1], cells[4]], "label": [0, 1], "index": [0, 1]},
                                        features=features)
    broken.set_transform(transform)
    assert Collate()(FillUnreadable(broken).__getitems__([0, 1]))["labels"].numel() == 0


def make_image_folder(root):
    """An image folder with two classes of real digit images, in assorted sizes and modes, and one corrupt file."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit in (("zero", 0), ("one", 1)):
        (root / name).mkdir(parents=True)
        pixels = [np.uint8(im * 15) for im in digits.images[digits.target == digit][:30]]
        for i, p in enumerate(pixels):
            image = Image.fromarray(p, mode="L")
            if i % 3 == 0:  # large enough for a 100 px minimum
                image = image.resize((120, 120))
            if i % 5 == 1:
                image = image.convert("RGBA")
            image.save(root / name / f"{i}.png")
    (root / "one" / "broken.png").write_bytes(b"\x89PNG this is not a png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "folder")


def test_image_folder_with_min_size_filter(image_folder):
    splits = load_splits("custom", str(image_folder), val_fraction=0.2, test_fraction=0.2)
    assert splits.class_names == ["one", "zero"] and splits.dropped == 0
    assert len(splits.train) + len(splits.val) + len(splits.test) == 61
    big = load_splits("custom", str(image_folder), val_fraction=0.2, test_fraction=0.2, min_image_size=100)
    # 10 of 30 per class are 120x120; the 40 small ones and the broken file are dropped.
    assert big.dropped == 41 and len(big.train) + len(big.val) + len(big.test) == 20


def test_saved_dataset_with_other_column_names_and_string_labels(tmp_path):
    pixels = [Image.new("RGB", (6, 6), color=(i * 10, 0, 0)) for i in range(20)]
    ds = datasets.Dataset.from_dict({"img": pixels, "labels": ["cat", "dog"] * 10, "extra": list(range(20))},
                                    features=datasets.Features({"img": datasets.Image(), "labels": datasets.Value("string"),
                                                                "extra": datasets.Value("int64")}))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(tmp_path / "saved")
    splits = load_splits("custom", str(tmp_path / "saved"), val_fraction=0.2)
    assert splits.class_names == ["cat", "dog"] and len(splits.test) == 4 and len(splits.val) == 4
    assert splits.train.column_names == ["image", "label", "index"]


def test_clear_errors_for_bad_datasets(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown dataset 'mnist'; choose one of: cats_vs_dogs"):
        load_splits("mnist")
    with pytest.raises(UserError, match="does not exist"):
        load_splits("custom", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="needs --dataset_path"):
        load_splits("custom")
    no_labels = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))] * 4},
                                           features=datasets.Features({"image": datasets.Image()}))
    no_labels.save_to_disk(tmp_path / "nolabels")
    with pytest.raises(UserError, match="the train split has no label column .*columns: image"):
        load_splits("custom", str(tmp_path / "nolabels"))


def test_unreachable_hub_fails_fast_naming_dataset_path(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub.*microsoft/cats_vs_dogs.*--dataset_path"):
        load_splits("cats_vs_dogs")
