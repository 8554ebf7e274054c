"""Training images decoded once and kept on the accelerator: batches without DataLoader workers (--data_on_device).

On a fast GPU the training step of a small model outruns the CPU workers that decode and augment each image
(reference.md E: mrl-pytorch's ReLIC epoch on an H200 is data-bound at 2,844 img/s, where its step alone runs at
5,100-11,600 img/s). For a dataset that fits in the accelerator's memory (CIFAR-10/100: 150 MB as uint8 at 32 px;
STL-10 with its unlabeled split at 96 px: about 2.8 GB) every image is decoded and resized once, the uint8 array is
cached on disk beside the datasets cache and copied to the accelerator, and each epoch's batches are gathered there
by index; train_ssl.py then augments them with its batched augmentation (mrl.batches.ssl_augment.BatchAugment), as
--gpu_augment.

The batches are the ones the DataLoader path gives: each epoch's order is Accelerate's seedable sampler's (a function
of (seed, epoch)), --batch_size is the global batch and every process takes its slice of it (split_batches), the last
partial batch is dropped, and an unreadable image's slot holds the next readable image after it (as the DataLoader
path's transforms.FillUnreadable fills it). So a run sees every sample once per epoch on any number of processes, every
process's batch has the same shape, a mid-epoch resume replays the uninterrupted run exactly, and with the same
augmentation seeds the views are bit-identical to --gpu_augment's (the decoding is the same: RGB, resized, uint8).
"""

import hashlib
import json
import os
import shutil
import time
import uuid

import numpy as np
import torch
import torchvision.transforms as T
from accelerate.data_loader import DataLoaderStateMixin, SeedableRandomSampler
from accelerate.state import GradientState
from tqdm.auto import tqdm

import datasets
from mrl import UserError
from mrl.batches.loaders import EpochLoader
from mrl.batches.transforms import ImageTransform

CACHE_FOLDER = "mrl_decoded"  # inside the datasets cache (HF_DATASETS_CACHE)
DECODE_VERSION = 1  # part of the cache key: change it when decode() changes, so that old caches are not read


def decode_transform(image_size):
    """What the --gpu_augment workers do to each image, and what is done here once: resize, keep uint8."""
    return T.Compose([T.Resize((image_size, image_size)), T.PILToTensor()])


def decoded_cache_key(dataset, image_size):
    """The dataset's fingerprint (datasets derives it from the source files and every split, select and shuffle
    applied to them, seeds included) with the image size: change any of them and the cache is not reused. Take it
    before a transform is attached (set_transform changes the fingerprint)."""
    text = json.dumps([DECODE_VERSION, dataset._fingerprint, len(dataset), image_size])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def decode(dataset, image_size, num_workers=0, batch_size=256):
    """Every image of `dataset` decoded: (images uint8 (N, 3, S, S), labels int64 (N,), readable bool (N,)).

    Decoded in DataLoader workers (this costs one pass, not one per epoch); an unreadable image is a zero image
    marked unreadable, whose slot the batches fill with another (`replacements`).
    """
    n = len(dataset)
    images = np.zeros((n, 3, image_size, image_size), dtype=np.uint8)
    labels, readable = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    loader = torch.utils.data.DataLoader(dataset.with_transform(ImageTransform(decode_transform(image_size))),
                                         batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    start = 0
    for batch in tqdm(loader, desc=f"decoding {n} images at {image_size} px (once)", leave=False):
        for i, sample in enumerate(batch, start):
            labels[i] = sample["label"]
            if sample["pixel_values"] is not None:
                images[i], readable[i] = sample["pixel_values"].numpy(), True
        start += len(batch)
    return images, labels, readable


def cached_decode(dataset, image_size, num_workers=0, cache_dir=None, log=print):
    """decode(), read from the disk cache when an earlier run (or another process) wrote it. The cache is one folder
    per key, written under a temporary name and renamed when complete, so a killed run never leaves half of one."""
    root = os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, CACHE_FOLDER)
    folder = os.path.join(root, decoded_cache_key(dataset, image_size))
    files = {name: os.path.join(folder, f"{name}.npy") for name in ("images", "labels", "readable")}
    damaged = False
    if all(os.path.isfile(f) for f in files.values()):
        try:
            arrays = tuple(np.load(files[name]) for name in ("images", "labels", "readable"))
            if arrays[0].shape != (len(dataset), 3, image_size, image_size):
                raise ValueError(f"images of shape {arrays[0].shape}")
            log(f"decoded images: read from {folder}")
            return arrays
        except (OSError, ValueError) as e:  # a damaged cache is decoded again and replaced
            log(f"warning: decoded-image cache {folder} cannot be read ({e}); decoding again")
            damaged = True
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its workers' seed from the global generator: the
        arrays = decode(dataset, image_size, num_workers)  # model's initialization must not depend on the cache
    log(f"decoded {len(dataset)} images in {time.perf_counter() - start:.1f} s; cached in {folder}")
    tmp = f"{folder}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        for name, array in zip(("images", "labels", "readable"), arrays):
            np.save(os.path.join(tmp, f"{name}.npy"), array)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"rows": len(dataset), "image_size": image_size, "fingerprint": dataset._fingerprint,
                       "unreadable": int((~arrays[2]).sum()), "version": DECODE_VERSION}, f)
        if damaged:
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except OSError as e:  # a read-only or full disk costs the cache, not the run; or another writer renamed first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(folder):
            log(f"warning: could not cache the decoded images in {folder}: {e}")
    return arrays


def replacements(readable):
    """For every sample, the one whose pixels fill its slot: itself when readable, else the next readable one after
    it (wrapping around), as transforms.FillUnreadable replaces an unreadable image in the DataLoader path."""
    good = np.flatnonzero(readable)
    if not len(good):
        raise UserError(f"none of the {len(readable)} training images can be read: corrupt or empty files?")
    following = good[np.searchsorted(good, np.arange(len(readable)) + 1) % len(good)]
    return np.where(readable, np.arange(len(readable)), following)


def epoch_order(num_samples, seed, epoch):
    """The sample order of `epoch`: Accelerate's seedable sampler's, as the prepared DataLoader draws it."""
    sampler = SeedableRandomSampler(range(num_samples), data_seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


class DeviceLoader(EpochLoader, DataLoaderStateMixin):
    """The training split on the accelerator, served batch by batch as the prepared training DataLoader would.

    Yields {"pixel_values": uint8 (B/P, 3, S, S), "labels": (B/P,)} on the accelerator, with "skipped" (an int) and
    "unreadable" (their rows) counting and naming the unreadable images whose slots were filled, where B is the
    global --batch_size and P the number of processes; len() is the number of batches per epoch. It takes part
    in Accelerate's gradient-accumulation bookkeeping like a prepared DataLoader (DataLoaderStateMixin): the last
    batch of an epoch ends the accumulation group, so an incomplete last group still steps.
    """

    def __init__(self, images, labels, readable, batch_size, seed, device, num_processes=1, process_index=0):
        if batch_size % num_processes:
            raise UserError(f"--batch_size {batch_size} cannot be split evenly over {num_processes} processes")
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.num_processes, self.process_index = num_processes, process_index
        self.num_samples = len(labels)
        self.images = torch.from_numpy(images).to(self.device)
        self.labels = torch.from_numpy(labels).to(self.device)
        self.readable = torch.from_numpy(readable)  # stays on the host: unreadable ones are counted there, no sync
        self.source = torch.from_numpy(replacements(readable))
        self.gradient_state = GradientState()
        self._drop_last = True

    @classmethod
    def from_dataset(cls, dataset, image_size, accelerator, batch_size, seed, num_workers=0, cache_dir=None):
        """Decode (or read from the cache) `dataset` -- untransformed -- and put it on `accelerator.device`, after
        checking that it fits there. The first process of each machine decodes, the others read its cache."""
        nbytes = len(dataset) * 3 * image_size ** 2
        if accelerator.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(accelerator.device)
            if nbytes > free / 2:
                raise UserError(f"--data_on_device: the {len(dataset)} training images take {nbytes / 2**30:.1f} GiB "
                                f"as uint8 at {image_size} px, more than half of the {free / 2**30:.1f} GiB free on "
                                f"{accelerator.device}; train without --data_on_device")
        with accelerator.local_main_process_first():
            arrays = cached_decode(dataset, image_size, num_workers, cache_dir, log=accelerator.print)
        return cls(*arrays, batch_size, seed, accelerator.device, accelerator.num_processes, accelerator.process_index)

    def __len__(self):
        return self.num_samples // self.batch_size  # full global batches only, as the DataLoader with drop_last

    def batches(self, epoch, start=0):
        """This process's share of the global batches of `epoch`, from batch `start` on (a mid-epoch resume)."""
        order = epoch_order(self.num_samples, self.seed, epoch)
        on_device = self.source[order].to(self.device)  # one copy per epoch; each batch is a slice of it
        share = self.batch_size // self.num_processes
        self.begin()
        try:
            for b in range(start, len(self)):
                first = b * self.batch_size + self.process_index * share
                rows = order[first:first + share]
                unreadable = [f"training image {i}" for i in rows[~self.readable[rows]].tolist()]
                index = on_device[first:first + share]
                self.end_of_dataloader = b == len(self) - 1
                yield {"pixel_values": self.images[index], "labels": self.labels[index], "skipped": len(unreadable),
                       "unreadable": unreadable}
        finally:
            self.end()
