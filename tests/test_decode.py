"""mrl.batches.decode (TorchCodec in the workers, PIL for what it cannot read) and mrl.batches.device_decode (--decode_on_device), on
scikit-learn's two real photos and the kinds of file ImageNet holds besides plain JPEGs."""

import io
import os
import sys

import numpy as np
import pytest
import sklearn.datasets
import torch
from accelerate.utils import send_to_device
from PIL import Image

import datasets
import mrl.batches.decode
from mrl import UserError
from mrl.batches.decode import is_plain_jpeg, open_header, open_image, resolve_decoder, torchcodec_decode_jpeg
from mrl.batches.device_decode import EncodedCollate, EncodeTransform, decode_batch
from mrl.batches.transforms import Collate, FillUnreadable, ImageTransform, build_transform

PHOTOS = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # pixels in [0, 1]: differences read as fractions of 255 levels


def photo(name):
    with open(os.path.join(PHOTOS, name), "rb") as f:
        return f.read()


def encode(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, **kwargs)
    return buffer.getvalue()


def small_photo(name, size=(120, 80)):
    return Image.open(io.BytesIO(photo(name))).convert("RGB").resize(size)


def hard_cases(tmp_path):
    """Cells of every kind: plain JPEGs, grayscale, CMYK, a PNG named .JPEG (by path), an EXIF-rotated photo
    (orientation 6: 90 degrees), a truncated JPEG, a file that is no image."""
    china, flower = small_photo("china.jpg"), small_photo("flower.jpg")
    exif = flower.getexif()
    exif[mrl.batches.decode.EXIF_ORIENTATION] = 6
    png_path = tmp_path / "n02105855_2933.JPEG"
    png_path.write_bytes(encode(china, format="PNG"))
    truncated = encode(flower, format="JPEG", quality=90)
    return {"plain": {"bytes": encode(china, format="JPEG", quality=90), "path": None},
            "plain2": {"bytes": encode(flower, format="JPEG", quality=90, progressive=True), "path": None},
            "gray": {"bytes": encode(flower.convert("L"), format="JPEG", quality=90), "path": None},
            "cmyk": {"bytes": encode(china.convert("CMYK"), format="JPEG", quality=90), "path": None},
            "png": {"bytes": None, "path": str(png_path)},
            "rotated": {"bytes": encode(flower, format="JPEG", quality=90, exif=exif.tobytes()), "path": None},
            "truncated": {"bytes": truncated[: len(truncated) * 2 // 3], "path": "/data/truncated.JPEG"},
            "junk": {"bytes": b"not an image", "path": "/data/junk.JPEG"}}


def split_of(cells):
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64"),
                                  "index": datasets.Value("int64")})
    n = len(cells)
    return datasets.Dataset.from_dict({"image": cells, "label": [100 + i for i in range(n)], "index": list(range(n))},
                                      features=features)


def mean_abs_diff(a, b):
    return (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).__abs__().mean()


@pytest.fixture
def count_torchcodec(monkeypatch):
    """Counts the images TorchCodec decodes, so the tests know which library read each one."""
    calls = []
    decode_jpeg = torchcodec_decode_jpeg()
    assert decode_jpeg is not None, "TorchCodec is installed in this venv"

    def counting(source, **kwargs):
        calls.append(len(source) if isinstance(source, list) else 1)
        return decode_jpeg(source, **kwargs)

    monkeypatch.setattr(mrl.batches.decode, "torchcodec_decode_jpeg", lambda: counting)
    monkeypatch.setattr(mrl.batches.device_decode, "torchcodec_decode_jpeg", lambda: counting)
    return calls


def test_torchcodec_decodes_real_photos_as_pil_does(count_torchcodec):
    for name in ("china.jpg", "flower.jpg"):
        cell = {"bytes": None, "path": os.path.join(PHOTOS, name)}
        fast, pil = open_image(cell, "torchcodec"), open_image(cell, "pil")
        assert fast.mode == pil.mode == "RGB" and fast.size == pil.size == (640, 427)
        assert mean_abs_diff(fast, pil) < 2  # of 255 levels: the same libjpeg-turbo, identical here
    assert sum(count_torchcodec) == 2


def test_what_torchcodec_is_not_given_goes_to_pil_with_the_same_result(tmp_path, count_torchcodec):
    cells = hard_cases(tmp_path)
    plain = {name: is_plain_jpeg(open_header(mrl.batches.decode.read_bytes(cell)), mrl.batches.decode.read_bytes(cell))
             for name, cell in cells.items() if name != "junk"}
    assert plain == {"plain": True, "plain2": True, "gray": True, "cmyk": False, "png": False, "rotated": False,
                     "truncated": False}
    for name, cell in cells.items():
        fast, pil = open_image(cell, "torchcodec"), open_image(cell, "pil")
        if name in ("truncated", "junk"):
            assert fast is None and pil is None, name
        else:
            assert fast.mode == "RGB" and fast.size == pil.size and mean_abs_diff(fast, pil) < 2, name
    assert open_image(cells["rotated"], "torchcodec").size == (80, 120)  # EXIF rotation applied
    assert sum(count_torchcodec) == 3  # the plain JPEGs and the grayscale one
    assert open_image(None, "torchcodec") is None and open_image({"bytes": None, "path": "/nonexistent"}) is None


def test_decoder_choice_and_fallback_without_torchcodec(monkeypatch):
    with pytest.raises(UserError, match="unknown --decoder 'cv2'"):
        resolve_decoder("cv2")
    assert resolve_decoder("torchcodec") == "torchcodec" and resolve_decoder("pil") == "pil"
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # `import torchcodec.decoders` fails
    assert torchcodec_decode_jpeg.__wrapped__() is None
    monkeypatch.setattr(mrl.batches.decode, "torchcodec_decode_jpeg", lambda: None)
    with pytest.warns(UserWarning, match="decoding with PIL instead"):
        assert resolve_decoder("torchcodec") == "pil"
    with pytest.warns(UserWarning):
        transform = EncodeTransform("torchcodec")  # the device path without TorchCodec: the workers decode all
    cell = {"bytes": photo("china.jpg"), "path": None}
    assert transform({"image": [cell], "label": [0], "index": [0]})["pixel_values"][0].shape == (3, 427, 640)


def test_seeded_augmentation_is_the_same_with_either_decoder(tmp_path, count_torchcodec):
    split = split_of([c for name, c in hard_cases(tmp_path).items() if name not in ("truncated", "junk")])
    out, transforms = {}, {}
    for decoder in ("torchcodec", "pil"):
        transforms[decoder] = ImageTransform(build_transform("resized_crop_flip", 32, MEAN, STD, train=True), seed=7,
                                             decoder=decoder)
        transforms[decoder].epoch = 3
        split.set_transform(transforms[decoder])
        out[decoder] = Collate()(FillUnreadable(split).__getitems__(list(range(len(split)))))
    # TorchCodec's tensors went through the same steps as tensors (the three plain JPEGs), the rest through PIL
    assert transforms["torchcodec"].tensor_transform is not None and transforms["pil"].tensor_transform is None
    assert sum(count_torchcodec) == 3
    assert out["torchcodec"]["labels"].tolist() == out["pil"]["labels"].tolist() == list(range(100, 106))
    per_image = (out["torchcodec"]["pixel_values"] - out["pil"]["pixel_values"]).abs().mean(dim=(1, 2, 3)) * 255
    assert per_image.max() < 1, per_image  # the same crops and flips; another epoch's differ by tens of levels
    # steps not known to take tensors alike (the SSL recipe's color jitter...): TorchCodec's pixels go through PIL
    ssl = ImageTransform(build_transform("ssl", 32, MEAN, STD, train=True), decoder="torchcodec")
    assert ssl.tensor_transform is None
    assert ssl({"image": [hard_cases(tmp_path)["plain"]], "label": [0], "index": [0]})["pixel_values"][0].shape == (
        3, 32, 32)


def worker_and_device_batches(tmp_path, train, evaluation=False, seed=11, epoch=2, size=32):
    """The same positions through the PIL worker path (ImageTransform + Collate) and the device path (EncodeTransform
    + EncodedCollate + decode_batch on the CPU), "truncated" (position 6) and "junk" (7) unreadable."""
    split = split_of(list(hard_cases(tmp_path).values()))
    positions = [6, 0, 3, 4, 5, 2, 1]
    transform = ImageTransform(build_transform("resized_crop_flip", size, MEAN, STD, train=train),
                               seed=seed if train else None, decoder="pil")
    transform.epoch = epoch
    split.set_transform(transform)
    worker = Collate()(FillUnreadable(split, evaluation).__getitems__(positions))
    split.set_transform(EncodeTransform("torchcodec"))
    device = EncodedCollate()(FillUnreadable(split, evaluation).__getitems__(positions))
    pixels = decode_batch(device, size, epoch, train, MEAN, STD, seed=seed if train else None)
    return worker, device, pixels


def test_device_path_evaluation_matches_the_worker_path(tmp_path, count_torchcodec):
    worker, device, pixels = worker_and_device_batches(tmp_path, train=False, evaluation=True)
    assert device["labels"].tolist() == worker["labels"].tolist() == [-1, 100, 103, 104, 105, 102, 101]
    assert device["skipped"] == worker["skipped"] == 1 and device["unreadable"] == ["/data/truncated.JPEG"]
    assert pixels.shape == worker["pixel_values"].shape == (7, 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels[0].abs().sum() == 0  # the unreadable image's evaluation slot: zeros, as in the worker path
    # resize 37 -> center crop 32 with torch's antialiased bilinear instead of PIL's: below 1 level on average (torch's
    # uint8 path on the CPU is built to match PIL's: 0.003 here; another seed's crops differ by 30 to 110 levels)
    assert mean_abs_diff(pixels, worker["pixel_values"]) * 255 < 1
    lengths = device["pixel_values"].lengths.tolist()
    assert [n > 0 for n in lengths] == [False, True, False, False, False, True, True]  # plain JPEGs: bytes
    assert count_torchcodec == [3]  # in one call
    # an unreadable image whose replacement was decoded by PIL in the worker (CMYK): zeros too
    cells = hard_cases(tmp_path)
    split = split_of([cells["junk"], cells["cmyk"]])
    split.set_transform(EncodeTransform())
    blank = EncodedCollate()(FillUnreadable(split, evaluation=True).__getitems__([0, 1]))
    pixels = decode_batch(blank, 32, 0, False, (0.5,) * 3, (0.25,) * 3)
    assert blank["labels"].tolist() == [-1, 101] and pixels[0].abs().sum() == 0 and pixels[1].abs().sum() > 0


def test_device_path_training_crops_are_the_worker_paths_crops(tmp_path):
    worker, device, pixels = worker_and_device_batches(tmp_path, train=True)
    # the truncated image's slot holds the next readable image after it (past junk, wrapping around), as in the
    # worker path
    assert device["labels"].tolist() == worker["labels"].tolist() == [100, 100, 103, 104, 105, 102, 101]
    assert device["unreadable"] == worker["unreadable"] == ["/data/truncated.JPEG"]
    assert pixels.shape == (7, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    # the same boxes and flips from the same per-sample seeds; only the resize arithmetic differs
    per_image = (pixels - worker["pixel_values"]).abs().mean(dim=(1, 2, 3)) * 255
    assert per_image.max() < 1, per_image
    _, _, other_epoch = worker_and_device_batches(tmp_path, train=True, epoch=3)
    assert ((other_epoch - pixels).abs().mean(dim=(1, 2, 3)) * 255).min() > 4  # a new epoch, new crops


def test_device_batch_moves_with_accelerate_and_keeps_the_bytes_on_the_host(tmp_path):
    split = split_of(list(hard_cases(tmp_path).values())[:4])
    split.set_transform(EncodeTransform())
    loader = torch.utils.data.DataLoader(FillUnreadable(split), batch_size=4, collate_fn=EncodedCollate())
    batch = send_to_device(next(iter(loader)), "meta")  # what a prepared DataLoader does with each batch
    encoded = batch["pixel_values"]
    assert batch["labels"].device.type == "meta" and encoded.device.type == "meta"
    assert encoded.data.device.type == encoded.index.device.type == "cpu"  # decode_jpeg reads host memory
    assert [p.device.type for p in encoded.pixels if p is not None] == ["meta"]  # the CMYK one, decoded by PIL
    cpu = send_to_device(next(iter(loader)), "cpu")
    small = decode_batch(cpu, 24, 0, True, MEAN, STD, seed=1)
    large = decode_batch(cpu, 40, 0, True, MEAN, STD, seed=1, channels_last=True)
    assert small.shape == (4, 3, 24, 24) and large.shape == (4, 3, 40, 40)
    assert large.is_contiguous(memory_format=torch.channels_last)
    # unseeded: drawn from the global generator, new crops on every call
    assert not torch.equal(decode_batch(cpu, 24, 0, True, MEAN, STD), decode_batch(cpu, 24, 0, True, MEAN, STD))
