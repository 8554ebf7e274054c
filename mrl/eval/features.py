"""Frozen embeddings of whole splits: extracted once per (checkpoint, dataset split) and cached on disk; and the
PCA baseline computed from them.

Extraction runs on every Accelerate process: each embeds its shard of the split, and `gather_for_metrics`
reassembles every batch in order, dropping the samples that the last batch repeated to even out the shards.
Unreadable images arrive as label -1 (see `transforms.Collate`) and are dropped after gathering.

Sized for ImageNet (1.28M x 2,048 features are 10.5 GB in float32): the main process streams each gathered batch
into a preallocated float16 file, so a split is never held whole in a process's memory, let alone twice, and the
evaluation reads it back memory-mapped. The cache of a split is two .npy files next to each other,
`<cache_dir>/<split>-<key>.features.npy` (float16, (n, D); float32 when a feature exceeds float16's range) and
`...labels.npy` (int64, written last: it marks the cache complete). The key hashes the weights file's contents,
the split's dataset fingerprint (which changes with the source files and with every select / filter / split that
produced the split), its length and the preprocessing. A second evaluation of the same checkpoint on the same data
loads the files instead of running the model; retraining into the same folder changes the weights and so the key.
Caches of the earlier format (`<split>-<key>.pt`, float32, one torch.save'd dict) are still read.
"""

import hashlib
import json
import os
import time

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from mrl import UserError
from mrl.batches.transforms import Collate, FillUnreadable

FLOAT16_MAX = float(np.finfo(np.float16).max)
# The PCA baseline's axes are fitted on at most this many train rows (at random): 100k rows estimate a 2,048 x
# 2,048 covariance closely, and the fit then costs the same on ImageNet as on CIFAR-10 (all of whose rows it uses).
PCA_FIT_SAMPLES = 100_000


def file_digest(path, chunk=1 << 20):
    """sha256 of a file's contents (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_digest(module):
    """sha256 of a module's weights and buffers (names, dtypes, shapes and bytes): the identity of a model that has
    no file of its own (a pretrained start, built from its source at evaluation time)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # flattened first: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def features_cache_key(weights_digest, split, dataset, preprocessing):
    """A short hex key for (weights, split, dataset rows, preprocessing)."""
    spec = {"weights": weights_digest, "split": split, "fingerprint": getattr(dataset, "_fingerprint", None),
            "rows": len(dataset), "preprocessing": preprocessing}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _loader(accelerator, dataset, batch_size, num_workers):
    loader = torch.utils.data.DataLoader(FillUnreadable(dataset, evaluation=True), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, collate_fn=Collate(),
                                         pin_memory=torch.cuda.is_available())
    return accelerator.prepare(loader)


def extract(accelerator, backbone, dataset, batch_size=256, num_workers=0):
    """(features float32 (n, D), labels (n,)) of a whole split, in memory on the CPU, gathered from every process.
    For small splits; `load_or_extract` streams a split to a file instead."""
    backbone.eval()
    return embed_loader(accelerator, backbone, _loader(accelerator, dataset, batch_size, num_workers))


@torch.no_grad()
def embedded_batches(accelerator, backbone, loader, channels_last=False):
    """(embeddings float32, labels) of each batch of a prepared (sharded) evaluation loader, gathered from all
    processes, in order, on the CPU; the samples the last batch repeated and unreadable images (label -1) are
    dropped. Each gathered batch leaves the accelerator at once: a whole split (a million images at 2,048 dims is
    8 GB) never accumulates in its memory. The caller sets the backbone's mode."""
    for batch in loader:
        x = batch["pixel_values"]
        if not len(batch["labels"]):  # FillUnreadable found no readable image in the whole split
            names = batch["unreadable"][:3]
            raise UserError(f"none of the images could be read ({', '.join(names)}, ...): corrupt or empty files?")
        with accelerator.autocast():
            z = backbone(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        z, y = accelerator.gather_for_metrics((z.float(), batch["labels"]))
        z, y = z.cpu(), y.cpu()
        yield z[y >= 0], y[y >= 0]


def embed_loader(accelerator, backbone, loader, channels_last=False):
    """embedded_batches concatenated: (features (n, D), labels (n,)) of the whole split, on the CPU."""
    batches = list(embedded_batches(accelerator, backbone, loader, channels_last))
    features, labels = torch.cat([z for z, _ in batches]), torch.cat([y for _, y in batches])
    if not len(labels):
        raise UserError("none of the images of the split could be read (corrupt or empty files?)")
    return features, labels


class FeatureWriter:
    """Rows appended batch by batch to a preallocated (capacity, dim) float16 array: a memory-mapped .npy file
    under `stem` (the cache), or memory when `stem` is None or the file cannot be written. `finish` returns
    (features, labels) as tensors over the rows written, the file's memory-mapped.

    A value beyond float16's range (65,504) would become inf: the first batch that holds one converts the rows
    written so far, and the rest, to float32. `message` says what happened to the cache (for the log line)."""

    def __init__(self, stem, capacity, dim):
        self.stem, self.rows, self.labels, self.message = stem, 0, [], ""
        self.path = f"{stem}.features.npy" if stem is not None else None
        self.tmp = None
        self.array = self._allocate(np.float16, capacity, dim)

    def _allocate(self, dtype, capacity, dim):
        """A new array, in a new temporary file next to the cache when there is one (self.tmp)."""
        if self.path is not None:
            tmp = f"{self.path}.{np.dtype(dtype).name}.tmp{os.getpid()}"
            try:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                array = open_memmap(tmp, mode="w+", dtype=dtype, shape=(capacity, dim))
                if hasattr(os, "posix_fallocate"):  # claim the disk now: a full disk under a memmap is a SIGBUS
                    with open(tmp, "r+b") as f:
                        os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
                self.tmp = tmp
                return array
            except OSError as e:  # e.g. a read-only checkpoint folder or a full disk: evaluate anyway
                self.message = f" (not cached: {e.strerror}: {e.filename or tmp}; see --feature_cache)"
                if os.path.exists(tmp):
                    os.remove(tmp)
                self.path = self.tmp = None
        return np.empty((capacity, dim), dtype)

    def append(self, features, labels):
        features = features.detach().cpu()
        if self.array.dtype == np.float16 and len(features) and features.abs().max() > FLOAT16_MAX:
            old, old_tmp = self.array, self.tmp
            self.array = self._allocate(np.float32, *old.shape)
            _copy_rows(old, self.array, self.rows)
            del old
            if old_tmp is not None:
                os.remove(old_tmp)
            self.message += " (float32: features beyond float16's range)"
        self.array[self.rows:self.rows + len(features)] = features.numpy()
        self.rows += len(features)
        self.labels.append(labels.cpu())

    def finish(self):
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        if self.path is None:
            return torch.from_numpy(self.array[:self.rows]), labels
        if self.rows < len(self.array):  # unreadable images were dropped: the file gets the exact row count
            exact = open_memmap(f"{self.tmp}.exact", mode="w+", dtype=self.array.dtype,
                                shape=(self.rows, self.array.shape[1]))
            _copy_rows(self.array, exact, self.rows)
            exact.flush()
            del exact
            os.replace(f"{self.tmp}.exact", self.tmp)
        self.array.flush()
        del self.array
        os.replace(self.tmp, self.path)  # atomic: a killed run never leaves a half-written file
        labels_tmp = f"{self.stem}.labels.tmp{os.getpid()}.npy"
        np.save(labels_tmp, labels.numpy())
        os.replace(labels_tmp, f"{self.stem}.labels.npy")  # last: the cache is complete once this file exists
        return read_cache(self.stem)


def _copy_rows(source, target, rows, chunk=1 << 16):
    for start in range(0, rows, chunk):
        target[start:min(start + chunk, rows)] = source[start:min(start + chunk, rows)]


def read_cache(stem):
    """(features, labels) cached under `stem` (`<cache_dir>/<split>-<key>`), or None when there is no cache. The
    features are memory-mapped (copy-on-write: pages are read from disk when touched and shared with the page
    cache), in their stored dtype; an earlier format's `<stem>.pt` (float32) is read too."""
    if os.path.isfile(f"{stem}.labels.npy") and os.path.isfile(f"{stem}.features.npy"):
        labels = torch.from_numpy(np.load(f"{stem}.labels.npy"))
        features = torch.from_numpy(np.load(f"{stem}.features.npy", mmap_mode="c"))
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
        return features, labels
    if os.path.isfile(f"{stem}.pt"):
        cached = torch.load(f"{stem}.pt", map_location="cpu", weights_only=True, mmap=True)
        return cached["features"], cached["labels"]
    return None


def has_cache(stem):
    return stem is not None and (os.path.isfile(f"{stem}.labels.npy") or os.path.isfile(f"{stem}.pt"))


def load_or_extract(accelerator, backbone, dataset, cache_stem, batch_size=256, num_workers=0, log=print,
                    desc="features"):
    """Features and labels of a split, from the cache under `cache_stem` when it exists, otherwise extracted (and
    cached there by the main process; `cache_stem=None` keeps them in memory only). Returns (features, labels,
    from_cache) on the main process, which alone runs the evaluation; (None, None, from_cache) on the others,
    which only take part in the extraction. The features are float16 (float32 for an old cache, or when a value
    exceeds float16's range), memory-mapped when cached. A trailing ".pt" on `cache_stem` (the earlier format's
    file name) is dropped: both formats are found from the same name. An extraction shows a progress bar named
    `desc` and ends with one line with its time, on the main process only."""
    if cache_stem is not None and cache_stem.endswith(".pt"):
        cache_stem = cache_stem[:-len(".pt")]
    found = [has_cache(cache_stem)]
    broadcast_object_list(found)  # every process must take the same branch: extraction is collective
    if found[0]:
        if not accelerator.is_main_process:
            return None, None, True
        try:
            features, labels = read_cache(cache_stem)
            log(f"{desc}: loaded cached features {cache_stem}")
            return features, labels, True
        except Exception as e:  # a truncated or foreign file: extract again and overwrite it
            if accelerator.num_processes > 1:
                raise UserError(f"cannot read the feature cache {cache_stem}: {e}; delete it and rerun") from e
            log(f"ignoring unreadable feature cache {cache_stem}: {type(e).__name__}")
    backbone.eval()
    writer, start = None, time.perf_counter()
    batches = tqdm(_loader(accelerator, dataset, batch_size, num_workers), desc=desc, unit="batch", dynamic_ncols=True,
                   disable=not accelerator.is_main_process, leave=False)
    timed = None  # (time, rows) after the first batch: the rate without the workers' start-up
    for z, y in embedded_batches(accelerator, backbone, batches):
        if accelerator.is_main_process:
            writer = writer or FeatureWriter(cache_stem, len(dataset), z.shape[1])
            writer.append(z, y)
            if timed is None:
                timed = (time.perf_counter(), writer.rows)
            elif timed[1] is not None and time.perf_counter() - timed[0] > 2:  # one line: the size and the cost
                rate = (writer.rows - timed[1]) / (time.perf_counter() - timed[0])
                log(f"{desc}: {len(dataset):,} images at about {rate:.0f} images/s here, about "
                    f"{len(dataset) / rate / 60:.1f} minutes in all")
                timed = (timed[0], None)
    features = labels = None
    if accelerator.is_main_process:
        if writer is None or not writer.rows:
            raise UserError("none of the images of the split could be read (corrupt or empty files?)")
        features, labels = writer.finish()
        cached = f", cached in {cache_stem}.*.npy" if writer.path is not None else ""
        seconds = time.perf_counter() - start
        log(f"{desc}: extracted {len(features)} x {features.shape[1]} in {seconds:.1f} s "
            f"({len(features) / seconds:.0f} images/s){cached}{writer.message}")
    accelerator.wait_for_everyone()
    return features, labels, False


def pca(train, *others, fit_samples=PCA_FIT_SAMPLES, seed=0, chunk=1 << 16, device=None):
    """The PCA baseline: principal axes of the train features (centered by their mean), sorted by explained
    variance, applied to train and the other sets alike. A prefix [:, :d] of the result is PCA to d dims.

    The mean and axes are fitted in float64 on `fit_samples` train rows drawn at random with `seed` (all rows when
    there are fewer; None or 0: all). Every set is then projected `chunk` rows at a time, on `device` (default:
    the CPU) in float32, into a new CPU array: float16 for float16 input (unless a projection exceeds its range)
    and float32 otherwise, so that no float64 copy of a split, nor a float32 one of a float16 split, is made."""
    device = torch.device(device or "cpu")
    rows = len(train)
    if fit_samples and rows > fit_samples:
        sample = train[torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:fit_samples].sort().values]
    else:
        sample = train
    starts = range(0, len(sample), chunk)
    mean = sum(sample[i:i + chunk].to(device).double().sum(0) for i in starts) / len(sample)
    covariance = 0
    for i in starts:
        centered = sample[i:i + chunk].to(device).double() - mean
        covariance = covariance + centered.T @ centered
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance / len(sample))
    eigenvalues, axes = eigenvalues.flip(0), eigenvectors.flip(1)  # descending variance
    # Fewer fit rows than dims (a run trained on a few hundred images, a 2,048-d backbone): the axes beyond the
    # sample's rank span its null space, arbitrary directions in which the train rows are rounding noise. A probe
    # standardizing that noise to unit variance and reading the evaluation rows' real spread there would be
    # guessing (chance accuracy), so those components are zero in every set: PCA to d > rank is PCA to the rank.
    # The rank cut-off is numpy.linalg.matrix_rank's for the covariance (largest eigenvalue x size x eps).
    empty = eigenvalues <= eigenvalues.max() * len(eigenvalues) * torch.finfo(torch.float64).eps
    # fix each axis's sign (eigh's is arbitrary) so that results do not depend on the LAPACK build
    signs = axes.gather(0, axes.abs().argmax(0, keepdim=True)).sign()
    axes = (axes * torch.where(signs == 0, torch.ones_like(signs), signs)).float()
    axes[:, empty] = 0
    mean = mean.float()
    projected = []
    for x in (train, *others):
        out = torch.empty(x.shape, dtype=torch.float16 if x.dtype == torch.float16 else torch.float32)
        for i in range(0, len(x), chunk):
            block = (x[i:i + chunk].to(device).float() - mean) @ axes
            if out.dtype == torch.float16 and block.abs().max() > FLOAT16_MAX:
                out = out.float()
            out[i:i + chunk] = block.cpu()
        projected.append(out)
    return projected
