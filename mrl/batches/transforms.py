"""Images from a split's undecoded `image` cells to batches: decoding, the transforms, and collating.

A sample is decoded only when used, so a corrupt file costs one sample, not the run: ImageTransform turns it into None,
FillUnreadable fills it in with another image of the split, and Collate counts and names it. Every sample's random
augmentation is seeded by its `index` (see mrl.data), so batches are the same whichever worker, process or resumed
run loads them.
"""

import torch
import torchvision.transforms as T

from mrl import UserError
from mrl.batches.decode import decode_opened, open_header, open_image, read_bytes, resolve_decoder, tensor_transform
from mrl.batches.reduced_decode import reduced_transform


def build_transform(augment, image_size, mean, std, train, preprocessing=None):
    """PIL image -> normalized tensor. `augment` names the train-time augmentation; eval is deterministic.

    `preprocessing`: a pretrained backbone's own (config.json's data.preprocessing: resize, crop_mode, interpolation;
    mrl.models.pretrained_backbones), which then is the evaluation transform, and augment "pretrained" trains with
    RandomResizedCrop + flip in its interpolation (timm's and torchvision's fine-tuning augmentation, without colour).
    """
    size = (image_size, image_size)
    if preprocessing and not train:
        return T.Compose(pretrained_eval_steps(image_size, preprocessing) + [T.ToTensor(), T.Normalize(mean, std)])
    if augment == "pretrained" and train:
        interpolation = T.InterpolationMode((preprocessing or {}).get("interpolation", "bilinear"))
        steps = [T.RandomResizedCrop(size, interpolation=interpolation), T.RandomHorizontalFlip()]
    elif augment == "ssl":  # the self-supervised two-view recipe (mrl.batches.ssl_augment; one view per call), eval: resize
        from mrl.batches.ssl_augment import ssl_augmentation

        steps = [ssl_augmentation(image_size)] if train else [T.Resize(size)]
    elif augment == "resized_crop_flip":
        steps = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if train
                 else [T.Resize(round(image_size / 0.875)), T.CenterCrop(size)])
    else:
        steps = [T.Resize(size)]
        if train and augment == "blog":
            steps += [T.RandomHorizontalFlip(), T.GaussianBlur(3)]
        elif train and augment in ("crop_flip", "crop"):
            steps.append(T.RandomCrop(size, padding=image_size // 8))
            steps += [T.RandomHorizontalFlip()] if augment == "crop_flip" else []
        elif augment not in ("blog", "crop_flip", "crop", "none", "pretrained"):
            raise UserError(f"unknown augmentation {augment!r}")
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def pretrained_eval_steps(image_size, preprocessing):
    """A pretrained backbone's evaluation resize and crop, as timm.data.create_transform builds it: the shorter side
    (crop_mode center; both sides for squash) resized to `resize` px, then the central image_size px. `resize` scales
    with --image_size when that differs from the recorded one."""
    resize = round(preprocessing["resize"] * image_size / preprocessing.get("image_size", image_size))
    interpolation = T.InterpolationMode(preprocessing.get("interpolation", "bilinear"))
    target = (resize, resize) if preprocessing.get("crop_mode") == "squash" else resize
    return [T.Resize(target, interpolation=interpolation), T.CenterCrop((image_size, image_size))]


def sample_seed(seed, epoch, index):
    """The seed of one sample's augmentation in one epoch. Reduced modulo 2**64 (torch.manual_seed's range), so
    that every --seed works; for the seeds that fit without it (below 18447) the values are those of earlier
    versions, so their runs resume with the same augmentations."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 64)


class ImageTransform:
    """The callable given to `Dataset.set_transform`: decodes each image and applies `transform` to it.

    With `seed` set, every sample's augmentation is drawn from its own generator seeded by (seed, epoch, index),
    so a sample is augmented the same way whichever worker, process or resumed run loads it: resuming mid-epoch
    and changing the number of workers or processes leave the training batches bit-identical. `epoch` is read
    when the DataLoader's workers are started (they get a copy), so set it before iterating over an epoch.
    Unreadable images come out as None; FillUnreadable fills them in. `decoder` is --decoder (mrl.batches.decode): which
    library decodes the plain JPEGs. TorchCodec's tensor goes straight to `transform`'s steps when they all take
    tensors (mrl.batches.decode.tensor_transform: the same draws, pixels within a level), else through a PIL image.
    `reduced_decode` (train_supervised.py --reduced_decode, one view only): a plain JPEG whose crop needs fewer pixels
    than it has is decoded at a reduced scale (mrl.batches.reduced_decode); the others as without it.
    """

    def __init__(self, transform, seed=None, views=1, decoder="pil", reduced_decode=False):
        self.decoder, self.reduced_decode = resolve_decoder(decoder), reduced_decode
        self.seed, self.views, self.epoch = seed, views, 0
        self.transform = transform

    @property
    def transform(self):
        return self._transform

    @transform.setter
    def transform(self, transform):  # also between epochs: progressive resizing trains each at its own resolution
        self._transform = transform
        self.tensor_transform = tensor_transform(transform) if self.decoder == "torchcodec" else None
        self.reduced = reduced_transform(transform) if self.reduced_decode and self.views == 1 else None

    def __call__(self, batch):
        samples, unreadable = [], []
        for item, index in zip(batch["image"], batch["index"]):
            with torch.random.fork_rng(devices=[], enabled=self.seed is not None):
                if self.seed is not None:
                    torch.manual_seed(sample_seed(self.seed, self.epoch, int(index)))
                views = self.views_of(item)
            path = item.get("path") if isinstance(item, dict) else None  # a missing cell (None) too
            unreadable.append(None if views is not None else path or f"row {index}")
            samples.append(None if views is None else views[0] if self.views == 1 else views)
        return {"pixel_values": samples, "label": batch["label"], "unreadable": unreadable}

    def views_of(self, item):
        """The sample's transformed views, or None when its image cannot be read."""
        as_tensor = self.tensor_transform is not None
        if self.reduced is None:
            image = open_image(item, self.decoder, as_tensor)
        else:  # the header parsed once, for both paths
            data = read_bytes(item)
            header = open_header(data) if data else None
            view = self.reduced(header, data) if header is not None else None
            if view is not None:
                return [view]
            image = decode_opened(header, data, self.decoder, as_tensor) if header is not None else None
        if image is None:
            return None
        transform = self.tensor_transform if torch.is_tensor(image) else self.transform
        return [transform(image) for _ in range(self.views)]


class FillUnreadable(torch.utils.data.Dataset):
    """A transformed split (ImageTransform's samples) whose unreadable images are filled in, so that every batch
    has the same shape on every process: NCCL's collectives do not check shapes, and DDP expects every process to
    take every step.

    Training (`evaluation=False`): an unreadable sample is replaced by the next readable one after it in the split
    (position + 1, + 2, ..., wrapping around), loaded through the same transform. Which one replaces it is a function
    of the split alone, so batches stay the same on any number of processes and after a resume; --data_on_device
    replaces the same way (mrl.batches.device_data.replacements). Evaluation (`evaluation=True`): a zero image shaped like
    that readable sample, labelled -1, which the metrics leave out. Either way the sample keeps the unreadable image's
    name in `unreadable` (Collate counts and names them). Only when no image of the whole split can be read does the
    sample stay None, and the batch comes out empty (Collate).
    """

    def __init__(self, dataset, evaluation=False):
        self.dataset, self.evaluation = dataset, evaluation

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position):
        return self.__getitems__([position])[0]

    def __getitems__(self, positions):  # the DataLoader fetches a whole batch through this
        samples = self.dataset.__getitems__(list(positions))
        for k, (position, sample) in enumerate(zip(positions, samples)):
            if sample["pixel_values"] is None:
                other = self.readable_after(position)
                if other is not None:
                    if self.evaluation:
                        other = {**other, "pixel_values": zeros_like(other["pixel_values"]), "label": -1}
                    samples[k] = {**other, "unreadable": sample["unreadable"]}
        return samples

    def readable_after(self, position):
        n = len(self.dataset)
        for other in range(position + 1, position + n):
            sample = self.dataset[other % n]
            if sample["pixel_values"] is not None:
                return sample
        return None


def zeros_like(pixels):
    return [torch.zeros_like(p) for p in pixels] if isinstance(pixels, list) else torch.zeros_like(pixels)


class Collate:
    """Stack a batch of FillUnreadable's samples; `skipped` counts the unreadable images among them (filled in),
    `unreadable` names them (their file path, or their row in the split). A batch in which something is still missing
    (no image of the split can be read) comes out empty: the scripts stop there with one line."""

    def __call__(self, batch):
        unreadable = [b["unreadable"] for b in batch if b.get("unreadable")]
        if any(b["pixel_values"] is None for b in batch):
            pixel_values, labels = torch.empty(0), torch.empty(0, dtype=torch.long)
        else:
            images = [b["pixel_values"] for b in batch]
            # several views per sample: one stacked tensor per view
            pixel_values = torch.stack(images) if torch.is_tensor(images[0]) else [torch.stack(v) for v in zip(*images)]
            labels = torch.tensor([b["label"] for b in batch], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels, "skipped": torch.tensor(len(unreadable)),
                "unreadable": unreadable}


def attach_transforms(splits, augment, image_size, mean, std, seed, views=1, train_transform=None, decoder="pil",
                      preprocessing=None, reduced_decode=False):
    """set_transform on every split (train augmented and seeded, val/test plain); returns the train transform.

    `train_transform`, when given, is the per-image train transform to use instead of build_transform's for
    `augment` (e.g. the SSL recipe at another strength); val/test still get `augment`'s eval transform. `decoder`:
    --decoder (mrl.batches.decode.DECODERS). `preprocessing`: a pretrained backbone's (see build_transform).
    `reduced_decode`: --reduced_decode (see ImageTransform), for every split.
    """
    decoder = resolve_decoder(decoder)  # here, so that a missing TorchCodec warns once
    train_transform = ImageTransform(
        train_transform or build_transform(augment, image_size, mean, std, train=True, preprocessing=preprocessing),
        seed, views, decoder, reduced_decode)
    splits.train.set_transform(train_transform)
    plain = ImageTransform(build_transform(augment, image_size, mean, std, train=False, preprocessing=preprocessing),
                           decoder=decoder, reduced_decode=reduced_decode)
    for ds in (splits.val, splits.test):
        if ds is not None:
            ds.set_transform(plain)
    return train_transform


def eval_transform(config, image_size=None):
    """A run's evaluation preprocessing (PIL image -> normalized tensor) from its config.json, as evaluate.py,
    embed.py and MatryoshkaEncoder preprocess; `image_size` overrides the run's (evaluate.py --image_size)."""
    data = config.get("data") or {}
    if not data.get("image_size"):
        raise UserError("the model's config.json has no data.image_size: it cannot say how to preprocess images")
    args = (image_size or data["image_size"], data.get("mean", (0.0,) * 3), data.get("std", (1.0,) * 3))
    try:  # a pretrained backbone's own resize and crop (data.preprocessing) where the run recorded them
        return build_transform(data.get("augment", "none"), *args, train=False, preprocessing=data.get("preprocessing"))
    except UserError:  # a train-only augmentation name (e.g. SSL's two views): evaluation is the plain resize
        return build_transform("none", *args, train=False)
