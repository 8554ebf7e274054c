"""Undecoded `image` cells ({"bytes", "path"}) to RGB images: TorchCodec for the plain JPEGs, PIL for everything else.

ImageNet is JPEG, and decoding is half or more of what a DataLoader worker spends per image (reference.md I).
TorchCodec (`--decoder torchcodec`) decodes a JPEG with the same libjpeg-turbo as PIL: on the photos of the tests the
pixels are identical. It cannot read everything PIL can, so an image goes to TorchCodec only when its header (read by
PIL, which parses no pixels for that: about 25 us) says it is a *plain* JPEG: JPEG format, RGB or grayscale, no EXIF
rotation, and the end-of-image marker present. The rest goes to PIL, as every image does with `--decoder pil`:
CMYK JPEGs, a PNG named .JPEG, rotated photos, truncated files (which PIL reads as unreadable: None). TorchCodec 0.17
handles CMYK and EXIF rotation itself on the CPU; PIL takes them anyway, because nvJPEG's CMYK (mrl.batches.device_decode)
and other TorchCodec versions are untested here, and they are few (ImageNet's train split: 22 CMYK, 1 PNG).
"""

import functools
import io
import warnings

import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from PIL import Image, ImageOps

from mrl import UserError

DECODERS = ("torchcodec", "pil")
EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"  # EOI: a JPEG cut short lacks it


def resolve_decoder(name):
    """The decoder to use for --decoder `name`: "pil" when TorchCodec is asked for but cannot decode here (not
    installed, or built against another torch), with one warning. Call it once, in the main process: the workers
    get the answer with their copy of the transform."""
    if name not in DECODERS:
        raise UserError(f"unknown --decoder {name!r}: choose one of {', '.join(DECODERS)}")
    if name == "torchcodec" and torchcodec_decode_jpeg() is None:
        warnings.warn("--decoder torchcodec: TorchCodec cannot decode JPEGs here (see `python -c \"import "
                      "torchcodec.decoders\"`); decoding with PIL instead", stacklevel=2)
        return "pil"
    return name


@functools.lru_cache(maxsize=None)
def torchcodec_decode_jpeg():
    """torchcodec.decoders.decode_jpeg when it imports and decodes a tiny JPEG, else None. Importing can fail in
    more ways than ImportError (its native library is built against one torch version), hence the test decode."""
    try:
        from torchcodec.decoders import decode_jpeg

        probe = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 30, 60)).save(probe, format="JPEG")
        if tuple(decode_jpeg(probe.getvalue()).shape) != (3, 8, 8):
            return None
        return decode_jpeg
    except Exception:
        return None


def read_bytes(item):
    """The encoded bytes of an `image` cell, read from its file when the cell holds only a path; None when there
    are none (a missing cell, a missing file)."""
    if not isinstance(item, dict):
        return None
    if item.get("bytes"):
        return item["bytes"]
    try:
        with open(item["path"], "rb") as f:
            return f.read()
    except (OSError, TypeError, KeyError):
        return None


def open_header(data):
    """PIL's lazily opened image (only the header is parsed), or None when PIL does not recognize the data."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception:  # UnidentifiedImageError, DecompressionBombError, ... for bad files
        return None


def is_plain_jpeg(image, data):
    """Whether TorchCodec (or nvJPEG) decodes `data` as PIL would: a complete RGB or grayscale JPEG, not rotated."""
    try:
        return (image.format == "JPEG" and image.mode in ("RGB", "L") and data[-2:] == JPEG_END
                and image.getexif().get(EXIF_ORIENTATION, 1) == 1)
    except Exception:  # a damaged EXIF block: PIL decides
        return False


def pil_rgb(image):
    """An opened PIL image, EXIF rotation applied, as RGB; None when its pixels cannot be read."""
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception:  # OSError (truncated), SyntaxError, ValueError... for bad files
        return None


def open_image(item, decoder="pil", as_tensor=False):
    """An undecoded `image` cell (bytes and/or path) as an RGB PIL image, or None when it cannot be read.

    cats_vs_dogs holds grayscale, RGBA, CMYK and palette images, and a few files that are not images at all.
    `decoder` (see resolve_decoder) decodes the plain JPEGs; with `as_tensor`, TorchCodec's decoding comes back as
    it is, a uint8 (3, H, W) tensor (for `tensor_transform`'s transforms), and only PIL's as a PIL image.
    """
    data = read_bytes(item)
    image = open_header(data) if data else None
    return None if image is None else decode_opened(image, data, decoder, as_tensor)


def decode_opened(image, data, decoder="pil", as_tensor=False):
    """open_image for an image whose header is already parsed (open_header(data))."""
    decode_jpeg = torchcodec_decode_jpeg() if decoder == "torchcodec" else None
    if decode_jpeg is not None and is_plain_jpeg(image, data):
        try:
            pixels = decode_jpeg(data, mode="RGB")  # uint8 (3, H, W)
            return pixels if as_tensor else Image.fromarray(pixels.permute(1, 2, 0).numpy())
        except RuntimeError:  # a corrupt stream TorchCodec refuses: PIL is more lenient
            pass
    return pil_rgb(image)


def tensor_transform(transform):
    """`transform` (build_transform's T.Compose of PIL steps, ToTensor among them) made to take TorchCodec's uint8
    tensor, or None when one of its steps has no twin here (the image then goes through PIL).

    Cropping and resizing the tensor skips the copy to a PIL image, and torchvision's v2 steps resize uint8 tensors
    natively: that makes TorchCodec's path faster than PIL's per core (benchmarks/bench_imagenet_loader.py), where
    decoding alone is not (the same libjpeg-turbo). The twins draw the same random numbers (their parameters depend
    on the image's size only) and torch's antialiased bilinear matches PIL's to within a level (tests/test_decode.py).
    """
    steps = getattr(transform, "transforms", None)
    if not steps or not any(isinstance(step, T.ToTensor) for step in steps):
        return None
    twins = [tensor_twin(step) for step in steps]
    return None if any(twin is None for twin in twins) else T2.Compose(twins)


def tensor_twin(step):
    """The torchvision.transforms.v2 step that does to a uint8 tensor what the v1 `step` does to a PIL image, for
    the steps of build_transform's "resized_crop_flip" and "none"; None for any other."""
    kind = type(step)
    if kind is T.ToTensor:
        return T2.ToDtype(torch.float32, scale=True)  # uint8 -> [0, 1]
    if kind is T.RandomResizedCrop:
        return T2.RandomResizedCrop(step.size, step.scale, step.ratio, step.interpolation, step.antialias)
    if kind is T.Resize:
        return T2.Resize(step.size, step.interpolation, step.max_size, step.antialias)
    if kind is T.CenterCrop:
        return T2.CenterCrop(step.size)
    if kind is T.RandomHorizontalFlip:
        return T2.RandomHorizontalFlip(step.p)
    if kind is T.Normalize:
        return T2.Normalize(step.mean, step.std, step.inplace)
    return None
