"""Webdataset shards (`.tar` files of `<key>.jpg` + `<key>.cls`) as the splits of datasets too large to index as a
map-style Dataset: ImageNet-1k as 1,024 shards (timm/imagenet-1k-wds), local or on the Hub. This module finds the
shards, counts their samples and opens them as streams (ShardedStream); mrl.batches.streams turns a stream into each
process's batches.

The shards are read with datasets (`load_dataset("webdataset", streaming=True)`), undecoded. The samples per shard are
counted once (tar headers only, no image read; cached) or read from the shards' `_info.json`: the loader needs them
to give every process the same number of steps. A sample's augmentation seed (its `index`, see
mrl.batches.transforms.ImageTransform) is a hash of its shard's file name and its key, the same whichever process or
worker reads it.
"""

import glob
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass

from tqdm.auto import tqdm

import datasets
from datasets.packaged_modules.webdataset.webdataset import base_plus_ext
from mrl import UserError
from mrl.data.splits import Splits, make_record
from mrl.utils import hub_access

HUB_PREFIX = "hf://"
# timm's webdataset layout: {"splits": {"train": {"filenames": [...], "shard_lengths": [...]}, "validation": ...}}
INFO_FILE = "_info.json"
CACHE_FOLDER = "mrl_shard_counts"  # inside the datasets cache (HF_DATASETS_CACHE)
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val")}


def is_webdataset(path):
    """Whether --dataset_path names webdataset shards: a glob or folder of .tar files (or of train/ and val/ folders
    of them), or a folder of them on the Hub (hf://datasets/<owner>/<name>[/folder])."""
    return path.startswith(HUB_PREFIX) or bool(_tar_files(path))


def _tar_files(path):
    if any(c in path for c in "*?["):
        return sorted(p for p in glob.glob(path) if p.endswith(".tar"))
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.tar")) + glob.glob(os.path.join(path, "*", "*.tar")))
    return []


def shard_lists(path):
    """{"train": [...], "validation": [...]}: the shards of each split, told apart by a path component or file name
    part "train" / "validation" or "val" (timm/imagenet-1k-wds: imagenet1k-train-0000.tar,
    imagenet1k-validation-00.tar)."""
    if path.startswith(HUB_PREFIX):
        from huggingface_hub import HfFileSystem

        root = path[len(HUB_PREFIX):].rstrip("/")
        files = [HUB_PREFIX + f for f in sorted(HfFileSystem().glob(f"{root}/**/*.tar"))]
    else:
        files = _tar_files(path)
    base = path if path.startswith(HUB_PREFIX) or os.path.isdir(path) else os.path.dirname(path)
    splits = {split: [f for f in files if _words(f[len(base):]) & set(names)] for split, names in SPLIT_NAMES.items()}
    for split, shards in splits.items():
        if not shards:
            raise UserError(f"no {split} shards in {path}: webdataset shards are told apart by 'train' and "
                            "'validation' (or 'val') in their file or folder names")
    return splits


def _words(path):
    return set(path.replace("\\", "/").replace("/", "-").replace("_", "-").replace(".", "-").split("-"))


def shard_counts(shards, log=print):
    """The number of samples in each shard: from an `_info.json` beside them, else counted from the tar headers
    (no image is read) and cached under the datasets cache, keyed by each shard's path, size and modification time.
    Each `.cls` label is read on the way (a few bytes), so that a label outside the class list is caught here, not
    in the middle of training."""
    info = _info_counts(shards)
    if info is not None:
        return info
    if shards[0].startswith(HUB_PREFIX):
        raise UserError(f"the shards in {os.path.dirname(shards[0])} have no {INFO_FILE} with their sample counts; "
                        "download them and pass the local folder, where they are counted once")
    counts = []
    for shard in tqdm(shards, desc="counting the samples of each shard (once)", leave=False, disable=len(shards) < 8):
        stat = os.stat(shard)
        key = hashlib.sha256(json.dumps([os.path.abspath(shard), stat.st_size, stat.st_mtime_ns]).encode()).hexdigest()
        cache = os.path.join(datasets.config.HF_DATASETS_CACHE, CACHE_FOLDER, key[:24] + ".json")
        try:
            with open(cache) as f:
                counts.append(json.load(f))
            continue
        except (OSError, ValueError):
            pass
        counts.append(count_shard(shard))
        try:  # written whole or not at all: another process may be reading it
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(f"{cache}.{os.getpid()}", "w") as f:
                json.dump(counts[-1], f)
            os.replace(f"{cache}.{os.getpid()}", cache)
        except OSError as e:  # a read-only cache costs the counting next time, not the run
            log(f"warning: could not cache the sample count of {shard}: {e}")
    return counts


def count_shard(shard):
    """{"samples": n, "labels": {label: count}}, grouping members into samples as datasets' webdataset reader does
    (consecutive members with the same key; hidden files skipped). A shard cut short is a UserError."""
    samples, labels, key = 0, {}, None
    try:
        with tarfile.open(shard, "r:") as tar:
            size, end = os.path.getsize(shard), 0
            for member in tar:
                end = member.offset_data + member.size
                name = os.path.basename(member.name)
                if not member.isreg() or name.startswith((".", "__")):
                    continue
                sample, field = base_plus_ext(member.name)
                if sample is None:
                    continue
                if sample != key:
                    samples, key = samples + 1, sample
                if field.lower() == "cls":
                    label = int(tar.extractfile(member).read())
                    labels[label] = labels.get(label, 0) + 1
    except (tarfile.TarError, OSError, ValueError) as e:
        raise UserError(f"cannot read the shard {shard} ({type(e).__name__}: {e}): truncated, damaged or not a tar "
                        "file; download it again") from None
    if end > size:  # tarfile ends quietly at a member whose data is cut off
        raise UserError(f"the shard {shard} is truncated ({size:,} bytes, its last member ends at byte {end:,}): "
                        "download it again")
    return {"samples": samples, "labels": {str(k): v for k, v in sorted(labels.items())}}


def _info_counts(shards):
    folder = os.path.dirname(shards[0])
    path = f"{folder}/{INFO_FILE}"
    try:
        if path.startswith(HUB_PREFIX):
            from huggingface_hub import HfFileSystem

            info = json.loads(HfFileSystem().read_text(path[len(HUB_PREFIX):]))
        elif os.path.isfile(path):
            with open(path) as f:
                info = json.load(f)
        else:
            return None
    except FileNotFoundError:
        return None
    lengths = {}
    for split in info.get("splits", {}).values():
        lengths.update(zip(split.get("filenames", []), split.get("shard_lengths", [])))
    missing = [s for s in shards if os.path.basename(s) not in lengths]
    if missing:
        raise UserError(f"{path} gives no sample count for {os.path.basename(missing[0])}")
    return [{"samples": int(lengths[os.path.basename(s)]), "labels": None} for s in shards]


@dataclass
class ShardedStream:
    """One split of webdataset shards: the datasets IterableDataset that reads them (undecoded), how many samples
    each shard holds, and the transform (set_transform, as on a map-style split) that the loader applies."""

    dataset: datasets.IterableDataset
    shards: list
    counts: list
    image_column: str
    label_column: str
    transform: object = None

    def __len__(self):
        return sum(self.counts)

    def set_transform(self, transform):
        self.transform = transform

    def row(self, example):
        """An example as the columns of a map-style split: image (undecoded), label, index (augmentation seed)."""
        label = example[self.label_column]
        label = label["label"] if isinstance(label, dict) else label  # a .json field holds {"label": ...}
        key = f"{os.path.basename(example['__url__'])}/{example['__key__']}"
        return example[self.image_column], int(label), sample_index(key)


def sample_index(key):
    """A stable 63-bit integer for a sample: the seed of its augmentation."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def open_stream(shards, counts, num_classes):
    """The shards as a streamed datasets IterableDataset with the image left undecoded."""
    bad = [(s, label) for s, c in zip(shards, counts) for label in (c["labels"] or {})
           if not 0 <= int(label) < num_classes]
    if bad:
        raise UserError(f"the shard {bad[0][0]} holds label {bad[0][1]}, outside the {num_classes} classes "
                        f"(labels are class indices 0..{num_classes - 1})")
    try:
        ds = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
        features = ds.features
    except Exception as e:
        raise UserError(f"cannot read the webdataset shards {shards[0]}, ...: {hub_access.one_line(e)}") from e
    image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((c for c in ("cls", "json") if c in features), None)
    if image is None or label is None:
        raise UserError(f"the shards {shards[0]}, ... hold {', '.join(features)}: an image (.jpg, .png, ...) and a "
                        "label (.cls, or .json with a 'label') are needed per sample")
    return ds.cast_column(image, datasets.Image(decode=False)), image, label


def stream_splits(name, path, class_names, *, seed=0, max_train_samples=None, max_eval_samples=None, log=print):
    """Splits whose train and val are ShardedStreams (test: none, as for the map-style ImageNet sources)."""
    if max_train_samples or max_eval_samples:
        raise UserError("--max_train_samples and --max_eval_samples do not apply to webdataset shards: pass a folder "
                        "or glob of fewer shards instead")
    streams = {}
    for split, shards in shard_lists(path).items():
        counts = shard_counts(shards, log)
        dataset, image, label = open_stream(shards, counts, len(class_names))
        streams[split] = ShardedStream(dataset, shards, [c["samples"] for c in counts], image, label)
    train, val = streams["train"], streams["validation"]
    digest = hashlib.sha256(json.dumps([[os.path.basename(s) for s in train.shards], train.counts]).encode())
    record = make_record(name, path, seed, val_fraction=0.0, test_fraction=0.0, min_image_size=0,
                         max_train_samples=None, max_eval_samples=None, format="webdataset",
                         source={s: {"rows": len(v), "shards": len(v.shards)} for s, v in streams.items()},
                         origin={"train": "train", "val": "validation", "test": None},
                         sizes={"train": len(train), "val": len(val), "test": 0}, train_digest=digest.hexdigest()[:16])
    return Splits(train, val, None, list(class_names), record=record)
