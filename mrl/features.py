"""Frozen embeddings of whole splits: extracted once per (checkpoint, dataset split) and cached on disk; and the
PCA baseline computed from them.

Extraction runs on every Accelerate process: each embeds its shard of the split, and `gather_for_metrics`
reassembles the whole split in order, dropping the samples that the last batch repeated to even out the shards.
Unreadable images arrive as label -1 (see `transforms.Collate`) and are dropped after gathering.

The cache file is `<cache_dir>/<split>-<key>.pt`, where the key hashes the weights file's contents, the split's
dataset fingerprint (which changes with the source files and with every select / filter / split that produced
the split), its length and the preprocessing. A second evaluation of the same checkpoint on the same data loads
the file instead of running the model; retraining into the same folder changes the weights and so the key.
"""

import hashlib
import json
import os

import torch
from accelerate.utils import broadcast_object_list

from mrl import UserError
from mrl.transforms import Collate, FillUnreadable


def file_digest(path, chunk=1 << 20):
    """sha256 of a file's contents (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def features_cache_key(weights_digest, split, dataset, preprocessing):
    """A short hex key for (weights, split, dataset rows, preprocessing)."""
    spec = {"weights": weights_digest, "split": split, "fingerprint": getattr(dataset, "_fingerprint", None),
            "rows": len(dataset), "preprocessing": preprocessing}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def extract(accelerator, backbone, dataset, batch_size=256, num_workers=0):
    """(features float32 (n, D), labels (n,)) of a whole split, on the CPU, gathered from every process."""
    loader = torch.utils.data.DataLoader(FillUnreadable(dataset, evaluation=True), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, collate_fn=Collate(),
                                         pin_memory=torch.cuda.is_available())
    backbone.eval()
    return embed_loader(accelerator, backbone, accelerator.prepare(loader))


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


def load_or_extract(accelerator, backbone, dataset, cache_file, batch_size=256, num_workers=0, log=print):
    """Features and labels of a split from `cache_file` when it exists, otherwise extracted (and saved there by
    the main process; `cache_file=None` disables the cache). Returns (features, labels, from_cache)."""
    found = [cache_file is not None and os.path.isfile(cache_file)]
    broadcast_object_list(found)  # every process must take the same branch: extraction is collective
    if found[0]:
        try:
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            log(f"loaded cached features {cache_file}")
            return cached["features"], cached["labels"], True
        except Exception as e:  # a truncated or foreign file: extract again and overwrite it
            if accelerator.num_processes > 1:
                raise UserError(f"cannot read the feature cache {cache_file}: {e}; delete it and rerun") from e
            log(f"ignoring unreadable feature cache {cache_file}: {type(e).__name__}")
    features, labels = extract(accelerator, backbone, dataset, batch_size, num_workers)
    message = f"extracted {len(features)} x {features.shape[1]} features"
    if cache_file is not None and accelerator.is_main_process:
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            tmp = f"{cache_file}.tmp{os.getpid()}"
            torch.save({"features": features, "labels": labels}, tmp)
            os.replace(tmp, cache_file)  # atomic: a killed run never leaves a half-written cache file
            message += f", cached in {cache_file}"
        except OSError as e:  # e.g. a read-only checkpoint folder: evaluate anyway
            message += f" (not cached: {e.strerror}: {e.filename}; see --feature_cache)"
    log(message)
    accelerator.wait_for_everyone()
    return features, labels, False


def pca(train, *others):
    """The PCA baseline: principal axes of the train features (centered by their mean), sorted by explained
    variance, applied to train and the other sets alike. A prefix [:, :d] of the result is PCA to d dims."""
    mean = train.double().mean(0)
    centered = train.double() - mean
    _, eigenvectors = torch.linalg.eigh(centered.T @ centered / len(train))
    axes = eigenvectors.flip(1)  # descending variance
    # fix each axis's sign (eigh's is arbitrary) so that results do not depend on the LAPACK build
    signs = axes.gather(0, axes.abs().argmax(0, keepdim=True)).sign()
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    return [((x.double() - mean) @ axes).float() for x in (train, *others)]
