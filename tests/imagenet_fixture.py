"""A tiny ImageNet in every layout mrl.data reads, built once per test session: an ILSVRC folder (train/ and val/,
one subfolder per synset), the same images as the Hub's parquet layout, and as webdataset shards (4 training
shards of 5 samples, and an uneven set of 3 shards of 7, 7 and 6).

Four real synsets from the middle and the end of the class list (not the first ones: a source that renumbered its
classes 0..3 would show), 5 training and 2 validation images each, of assorted sizes up to 500 px. Among the
training images: a grayscale JPEG, a CMYK JPEG, a PNG named .JPEG, a JPEG rotated by its EXIF orientation tag (6)
and a truncated JPEG (unreadable).

The fixture `tiny_imagenet` (tests/conftest.py imports it for every test module).
"""

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SYNSET_INDICES = (7, 207, 530, 985)  # positions in mrl/imagenet_classes/imagenet_synsets.txt
TRAIN_PER_CLASS, VAL_PER_CLASS = 5, 2


@dataclass
class TinyImageNet:
    folder: Path  # ILSVRC layout
    parquet: Path  # the Hub's layout: data/train-00000-of-00001.parquet, data/validation-...
    shards: Path  # webdataset: imagenet-train-000{0..3}.tar, imagenet-validation-0000.tar
    uneven: Path  # webdataset: 3 training shards of 7, 7 and 6 samples
    synsets: tuple  # the 4 synset ids, in label order
    labels: tuple  # their class indices
    truncated: str  # file name of the unreadable training image


def _jpeg(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85, **kwargs)
    return buffer.getvalue()


def _image_bytes(rng, kind):
    """One image file's bytes: random smooth colour content of a random size up to 500 px."""
    width, height = (int(v) for v in rng.integers(40, 501, size=2))
    small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    if kind == "gray":
        return _jpeg(image.convert("L"))
    if kind == "cmyk":
        return _jpeg(image.convert("CMYK"))
    if kind == "png":
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
        return _jpeg(image, exif=exif)
    if kind == "truncated":
        data = _jpeg(image)
        return data[:len(data) // 3]
    return _jpeg(image)


SPECIAL = {(0, 0): "gray", (1, 0): "cmyk", (2, 0): "png", (3, 0): "exif", (0, 1): "truncated"}  # (class, image)


def build_tiny_imagenet(root):
    from mrl.data.imagenet import synsets

    root = Path(root)
    names = tuple(synsets()[i] for i in SYNSET_INDICES)
    rng = np.random.default_rng(0)
    samples = {"train": [], "val": []}  # (file name, bytes, label index)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, (synset, label) in enumerate(zip(names, SYNSET_INDICES)):
            for i in range(count):
                kind = SPECIAL.get((c, i), "rgb") if split == "train" else "rgb"
                name = f"{synset}_{split}_{i:02d}.JPEG"
                data = _image_bytes(rng, kind)
                samples[split].append((name, data, label))
                path = root / "folder" / split / synset / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    _write_parquet(root / "parquet", samples)
    # shards hold the classes interleaved (sample i of every class, then i + 1), as shuffled shards would
    train = sorted(samples["train"], key=lambda s: (s[0].rsplit("_", 1)[1], s[0]))
    _write_shards(root / "shards", "train", train, [5, 5, 5, 5])
    _write_shards(root / "shards", "validation", samples["val"], [len(samples["val"])])
    _write_shards(root / "uneven", "train", train, [7, 7, 6])
    _write_shards(root / "uneven", "validation", samples["val"], [len(samples["val"])])
    truncated = next(name for name, _, _ in samples["train"] if SPECIAL.get(_class_image(name, names)) == "truncated")
    return TinyImageNet(root / "folder", root / "parquet", root / "shards", root / "uneven", names, SYNSET_INDICES,
                        truncated)


def _class_image(name, names):
    synset, _, i = name[:-len(".JPEG")].split("_")
    return names.index(synset), int(i)


def _write_parquet(root, samples):
    import datasets
    from mrl.data.imagenet import class_label

    features = datasets.Features({"image": datasets.Image(), "label": class_label()})
    (root / "data").mkdir(parents=True)
    for split, hub_name in (("train", "train"), ("val", "validation")):
        rows = {"image": [{"bytes": data, "path": name} for name, data, _ in samples[split]],
                "label": [label for _, _, label in samples[split]]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "data" / f"{hub_name}-00000-of-00001.parquet"))


def _write_shards(root, split, samples, sizes):
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for n, size in enumerate(sizes):
        with tarfile.open(root / f"imagenet-{split}-{n:04d}.tar", "w") as tar:
            for name, data, label in samples[start:start + size]:
                key = name[:-len(".JPEG")]
                for suffix, payload in (("jpg", data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        start += size


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
    return build_tiny_imagenet(tmp_path_factory.mktemp("tiny_imagenet"))


if __name__ == "__main__":  # build it somewhere to look at: python tests/imagenet_fixture.py DIR
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for mrl

    print(build_tiny_imagenet(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.getcwd(), "tiny_imagenet")))
