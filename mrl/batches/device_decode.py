"""--decode_on_device: the DataLoader workers send JPEG bytes, the training device decodes and augments them in batches.

A PIL pipeline needs 10 to 30 CPU cores per GPU to keep a ResNet-50 fed on ImageNet (reference.md I: ~3,300 img/s per
A100 against a few hundred per core). Here the workers only read each image's bytes and check its header
(mrl.batches.decode.is_plain_jpeg); the device decodes the whole batch at once (TorchCodec's `decode_jpeg` on a list: one
nvJPEG call on CUDA) and draws each sample's RandomResizedCrop and flip from the same per-sample seed as the worker
path (mrl.batches.transforms.sample_seed(seed, epoch, index)), so the crops are the worker path's crops; only the resizing
arithmetic differs (torch's antialiased bilinear instead of PIL's). The images that are not plain JPEGs (CMYK, PNG,
EXIF-rotated) are decoded by PIL in the worker and travel as pixels; unreadable ones are None, which
transforms.FillUnreadable fills in as in the worker path.

The pieces, in the order the data flows:
    EncodeTransform   -> Dataset.set_transform (instead of ImageTransform), run by the workers
    transforms.FillUnreadable, then EncodedCollate -> the DataLoader's collate_fn (instead of Collate)
    decode_batch      -> in the training step: the batch's pixels on its device
"""

import warnings

import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F

from mrl.batches.decode import is_plain_jpeg, open_header, pil_rgb, read_bytes, resolve_decoder, torchcodec_decode_jpeg
from mrl.batches.transforms import sample_seed


class EncodeTransform:
    """The callable given to `Dataset.set_transform` for --decode_on_device: each sample's `pixel_values` is its
    JPEG bytes (uint8, 1-D) when it is a plain JPEG, else its pixels decoded by PIL (uint8 (3, H, W)), or None when
    unreadable; `index` travels with it, since it seeds the sample's augmentation on the device. With TorchCodec
    missing (see mrl.batches.decode.resolve_decoder) every image is decoded here by PIL."""

    def __init__(self, decoder="torchcodec"):
        self.decoder = resolve_decoder(decoder)

    def __call__(self, batch):
        samples, unreadable = [], []
        for item, index in zip(batch["image"], batch["index"]):
            data = read_bytes(item)
            image = open_header(data) if data else None
            if image is not None and self.decoder == "torchcodec" and is_plain_jpeg(image, data):
                sample = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a copy the tensor owns
            else:
                image = pil_rgb(image) if image is not None else None
                sample = F.pil_to_tensor(image) if image is not None else None
            path = item.get("path") if isinstance(item, dict) else None
            unreadable.append(None if sample is not None else path or f"row {index}")
            samples.append(sample)
        return {"pixel_values": samples, "label": batch["label"], "index": batch["index"], "unreadable": unreadable}


class EncodedImages:
    """A batch's images as the workers send them: the JPEGs' bytes concatenated (`data`, uint8) with their
    `lengths` (0 for an image that is not a JPEG), the images decoded by PIL (`pixels`: uint8 (3, H, W), or None
    where a JPEG is, or nothing: a blank evaluation slot), and each sample's `index` (its augmentation seed).

    `.to(device)` is what Accelerate calls to move a batch to the device: it moves the decoded pixels and records
    the device to decode on, but the bytes and indices stay on the host, where the JPEG decoder reads them (nvJPEG
    too) and where the seeds are drawn without waiting for the device.
    """

    def __init__(self, data, lengths, pixels, index, device="cpu"):
        self.data, self.lengths, self.pixels, self.index = data, lengths, pixels, index
        self.device = torch.device(device)

    def __len__(self):
        return len(self.lengths)

    def to(self, device, non_blocking=False):
        pixels = [p if p is None else p.to(device, non_blocking=non_blocking) for p in self.pixels]
        return EncodedImages(self.data, self.lengths, pixels, self.index, device)

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this: pinned pages make the copies to a GPU faster
        pixels = [p if p is None else p.pin_memory() for p in self.pixels]
        return EncodedImages(self.data.pin_memory(), self.lengths, pixels, self.index, self.device)

    def decode(self):
        """Every image as uint8 (3, H, W) on `device`, None for a blank slot. The JPEGs are decoded in one call."""
        images = list(self.pixels)
        jpegs = [i for i, n in enumerate(self.lengths.tolist()) if n > 0]
        if jpegs:
            encoded = torch.split(self.data, [n for n in self.lengths.tolist() if n > 0])
            for i, image in zip(jpegs, decode_jpegs(list(encoded), self.device)):
                images[i] = image
        return images


def decode_jpegs(encoded, device):
    """Decode a list of JPEGs (uint8 1-D on the host) on `device`, in one call. When that call fails (a corrupt
    stream the header check let through; nvJPEG is stricter than libjpeg), each is decoded alone, and one that still
    fails is read by PIL on the host; one that nobody can read comes out None (a blank image), with a warning."""
    decode_jpeg = torchcodec_decode_jpeg()
    if decode_jpeg is not None:
        try:
            return decode_jpeg(encoded, mode="RGB", device=device)
        except RuntimeError:
            pass
    images = []
    for data in encoded:
        try:
            images.append(decode_jpeg(data, mode="RGB", device=device))
        except (RuntimeError, TypeError):  # TypeError: no TorchCodec
            image = pil_rgb(open_header(data.numpy().tobytes()))
            if image is None:
                warnings.warn("--decode_on_device: a JPEG that passed the header check cannot be decoded; "
                              "it is a blank image in this batch")
            images.append(None if image is None else F.pil_to_tensor(image).to(device))
    return images


class EncodedCollate:
    """Batch FillUnreadable's samples of EncodeTransform: {"labels", "pixel_values": EncodedImages, "skipped",
    "unreadable"}, as transforms.Collate (a batch with an image still missing comes out empty). FillUnreadable's
    evaluation slot for an unreadable image (zeros like the replacement, label -1) becomes a blank image, which
    decode_batch turns into zeros as the worker path has them."""

    def __call__(self, batch):
        unreadable = [b["unreadable"] for b in batch if b.get("unreadable")]
        skipped = torch.tensor(len(unreadable))
        if any(b["pixel_values"] is None for b in batch):
            empty = EncodedImages(torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), [],
                                  torch.empty(0, dtype=torch.long))
            return {"labels": torch.empty(0, dtype=torch.long), "pixel_values": empty, "skipped": skipped,
                    "unreadable": unreadable}
        jpegs, lengths, pixels = [], [], []
        for b in batch:
            sample = b["pixel_values"]
            # FillUnreadable's evaluation blank: zeros like the bytes or pixels it copied, labelled -1
            blank = b["label"] == -1 and not sample.any()
            is_jpeg = sample.dim() == 1 and not blank
            jpegs += [sample] if is_jpeg else []
            lengths.append(len(sample) if is_jpeg else 0)
            pixels.append(sample if sample.dim() == 3 and not blank else None)
        data = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)
        index = torch.tensor([int(b["index"]) for b in batch], dtype=torch.long)
        # labels first: Accelerate's find_batch_size reads the first entry
        return {"labels": torch.tensor([b["label"] for b in batch], dtype=torch.long),
                "pixel_values": EncodedImages(data, torch.tensor(lengths, dtype=torch.long), pixels, index),
                "skipped": skipped, "unreadable": unreadable}


def decode_batch(batch, size, epoch, train, mean, std, seed=None, channels_last=False, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), crop_fraction=0.875):
    """EncodedCollate's batch (moved by Accelerate or not) -> normalized float pixels (B, 3, size, size) on its
    device: what transforms.build_transform("resized_crop_flip", size, ...) gives in the worker path.

    train: RandomResizedCrop(size, scale, ratio) + horizontal flip, drawn from sample_seed(seed, epoch, index) as
    ImageTransform draws them (the same boxes and flips); seed None draws from the global generator. Evaluation:
    resize the shorter side to size / crop_fraction (256 for 224), center crop. `size` is per call: the epoch's
    resolution under progressive resizing. A blank image (an evaluation slot FillUnreadable emptied) is zeros.
    Nothing here waits for the device except the JPEG decoder itself.
    """
    encoded = batch["pixel_values"]
    if not len(encoded):
        return torch.empty(0, 3, size, size, device=encoded.device)
    crops = []
    # seeded: the CPU generator is restored after (the device's is never touched: it is the model's)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        for image, index in zip(encoded.decode(), encoded.index.tolist()):
            if image is None:
                crops.append(None)
            elif train:
                if seed is not None:  # not torch.manual_seed, which would reseed the GPU's generator too
                    torch.default_generator.manual_seed(sample_seed(seed, epoch, index))
                top, left, height, width = T.RandomResizedCrop.get_params(image, scale, ratio)  # reads image.shape
                crop = F.resized_crop(image, top, left, height, width, [size, size], antialias=True)
                crops.append(F.horizontal_flip(crop) if torch.rand(1) < 0.5 else crop)
            else:
                resized = F.resize(image, [round(size / crop_fraction)], antialias=True)
                crops.append(F.center_crop(resized, [size, size]))
    blank = torch.zeros(3, size, size, dtype=torch.uint8, device=encoded.device)
    pixels = torch.stack([blank if crop is None else crop for crop in crops]).float()
    for c in range(3):  # (x / 255 - mean) / std with Python numbers: no small tensor copied to the device
        pixels[:, c].sub_(255 * mean[c]).div_(255 * std[c])
    for i, crop in enumerate(crops):
        if crop is None:
            pixels[i].zero_()  # as FillUnreadable's zero image in the worker path
    return pixels.contiguous(memory_format=torch.channels_last) if channels_last else pixels
