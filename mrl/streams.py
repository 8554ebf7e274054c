"""Training and evaluation batches streamed from webdataset shards (`.tar` files of `<key>.jpg` + `<key>.cls`), for
datasets too large to index as a map-style Dataset: ImageNet-1k as 1,024 shards (timm/imagenet-1k-wds), local or on
the Hub.

The shards are read with datasets (`load_dataset("webdataset", streaming=True)`): each process reads its own shards
(`split_dataset_by_node`) and within it each DataLoader worker its own (datasets assigns them), so no process reads
what another trains on. Every epoch reshuffles the shard order and a buffer of samples, seeded by (--seed, epoch).

What map-style data gives for free, a stream has to earn:
- Every process must take the same number of steps, or the gradient all-reduce hangs. The samples per shard are
  counted once (tar headers only, no image read; cached) or read from the shards' `_info.json`, and every process
  stops after the number of batches the least-served process can fill in any epoch (StreamLoader.describe() says how
  many samples an epoch leaves out). Evaluation pads instead: every process yields the number of batches the
  best-served one needs, padded with zero images labelled -1, which the metrics leave out.
- Shards that do not divide over the processes make datasets fall back to every process reading every shard and
  keeping 1 sample in N (N times the reading); shards that do not divide over a process's workers leave some workers
  with one shard more (or, fewer shards than workers, idle). Both are said once, when the loader is built.
- Resume: the epoch, and the position within it. A process's sample order is a function of (seed, epoch, process,
  number of processes and workers), so a resumed run skips the batches already trained on -- reading those samples
  again but not decoding them -- and continues with the very batches the interrupted run would have taken (with
  the same number of processes and --num_workers).
- A sample's augmentation seed (its `index`, see mrl.transforms.ImageTransform) is a hash of its shard's file name
  and its key, the same whichever process or worker reads it.
"""

import glob
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from itertools import count, islice

import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from PIL import Image
from tqdm.auto import tqdm

import datasets
from datasets.distributed import split_dataset_by_node
from datasets.packaged_modules.webdataset.webdataset import base_plus_ext
from mrl import UserError
from mrl.guards import ignore_signals_in_worker

HUB_PREFIX = "hf://"
# timm's webdataset layout: {"splits": {"train": {"filenames": [...], "shard_lengths": [...]}, "validation": ...}}
INFO_FILE = "_info.json"
CACHE_FOLDER = "mrl_shard_counts"  # inside the datasets cache (HF_DATASETS_CACHE)
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "val")}
SHUFFLE_BUFFER = 2000  # samples per worker: about 220 MB of ImageNet JPEGs


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
        raise UserError(f"cannot read the webdataset shards {shards[0]}, ...: {type(e).__name__}: "
                        f"{str(e).splitlines()[0]}") from e
    image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((c for c in ("cls", "json") if c in features), None)
    if image is None or label is None:
        raise UserError(f"the shards {shards[0]}, ... hold {', '.join(features)}: an image (.jpg, .png, ...) and a "
                        "label (.cls, or .json with a 'label') are needed per sample")
    return ds.cast_column(image, datasets.Image(decode=False)), image, label


def stream_splits(name, path, class_names, *, seed=0, max_train_samples=None, max_eval_samples=None, log=print):
    """mrl.data.Splits whose train and val are ShardedStreams (test: none, as for the map-style ImageNet sources)."""
    from mrl.data import Splits

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
    record = {"dataset": name, "dataset_path": path, "seed": seed, "val_fraction": 0.0, "test_fraction": 0.0,
              "min_image_size": 0, "max_train_samples": None, "max_eval_samples": None, "format": "webdataset",
              "source": {s: {"rows": len(v), "shards": len(v.shards)} for s, v in streams.items()},
              "origin": {"train": "train", "val": "validation", "test": None},
              "sizes": {"train": len(train), "val": len(val), "test": 0},
              "train_digest": digest.hexdigest()[:16]}
    return Splits(train, val, None, list(class_names), record=record)


class _Chunks(torch.utils.data.IterableDataset):
    """What a DataLoader worker yields: its share of the process's samples, `size` at a time, decoded and transformed
    (see StreamLoader.batches). The chunks before `skip` (a resume) are only counted: {"rows": n}."""

    def __init__(self, stream, rows, size, skip):
        self.stream, self.rows, self.size, self.skip = stream, rows, size, skip

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        examples = iter(self.rows)  # in a worker, datasets reads only this worker's shards
        for c in count():
            chunk = list(islice(examples, self.size))
            if not chunk:
                return
            # with every worker still running, the DataLoader hands out chunk c of worker w as chunk c*workers + w
            if c * workers + worker < self.skip:
                yield {"rows": len(chunk)}
                continue
            yield self.decode(chunk)

    def decode(self, chunk):
        images, labels, indices = zip(*(self.stream.row(example) for example in chunk))
        out = self.stream.transform({"image": list(images), "label": list(labels), "index": list(indices)})
        readable = [p is not None for p in out["pixel_values"]]
        kept = [p for p in out["pixel_values"] if p is not None]
        return {"rows": len(chunk), "pixel_values": _stack(kept) if kept else None, "labels": torch.tensor(labels),
                "readable": torch.tensor(readable), "unreadable": [u for u in out["unreadable"] if u]}


def _stack(samples):
    """Samples (a tensor each, or a list of views) as one tensor (or one per view)."""
    return torch.stack(samples) if torch.is_tensor(samples[0]) else [torch.stack(v) for v in zip(*samples)]


def _apply(pixels, fn):
    return fn(pixels) if torch.is_tensor(pixels) else [fn(p) for p in pixels]


class StreamLoader(DataLoaderStateMixin):
    """Batches of a ShardedStream for this process, in the format of mrl.transforms.Collate ({"pixel_values",
    "labels", "skipped", "unreadable"}), on `device`. Not passed to `accelerator.prepare`: it splits the data itself
    (Accelerate would make every process read everything and dispatch batches from the first).

    `batch_size` is the global batch (--batch_size), of which each of the `num_processes` takes an equal share.
    len(): the batches per epoch, the same on every process. Training (`train=True`): shuffled per epoch
    (set_epoch, or the `epoch` of `batches`), cut at the common number of batches, an unreadable image's slot filled
    with the next readable image of its batch (as transforms.FillUnreadable fills it with the next of its split).
    Evaluation: in shard order, every sample once, padded to the common number of batches; unreadable and padding
    slots are zero images labelled -1. As a DeviceLoader, it takes part in Accelerate's gradient-accumulation
    bookkeeping (the last batch of an epoch ends the accumulation group) and offers epoch_batches to mrl.loop.
    """

    def __init__(self, stream, batch_size, *, train, seed=0, num_workers=0, num_processes=1, process_index=0,
                 device="cpu", shuffle_buffer=SHUFFLE_BUFFER, log=print):
        if stream.transform is None:
            raise ValueError("set_transform the stream before loading it")
        if batch_size % num_processes:
            raise UserError(f"--batch_size {batch_size} cannot be split evenly over {num_processes} processes")
        self.stream, self.train, self.num_workers, self.device = stream, train, num_workers, torch.device(device)
        self.batch_size, self.share, self.num_processes = batch_size, batch_size // num_processes, num_processes
        rows = stream.dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if train else stream.dataset
        self.rows = split_dataset_by_node(rows, rank=process_index, world_size=num_processes)
        self.epoch = 0
        low, high = self.samples_per_process()
        self.steps = low // self.share if train else -(-high // self.share)
        self.gradient_state, self._drop_last = GradientState(), True
        for warning in self.warnings():
            log(f"warning: {warning}")

    def samples_per_process(self):
        """The fewest and the most samples any process can draw in an epoch, whatever the shard order.

        Whole shards per process (their number divides by the processes): between the sum of the smallest and of
        the largest shards a process can get. Otherwise every worker reads the same shards on every process and
        each process keeps 1 sample in P of them: a stream of n samples leaves ceil((n - rank) / P), within (P-1)/P
        of n/P, for each of the streams (workers) that read."""
        counts, p = sorted(self.stream.counts), self.num_processes
        if len(counts) % p == 0:
            per = len(counts) // p
            return sum(counts[:per]), sum(counts[-per:])
        readers = min(max(self.num_workers, 1), len(counts))
        total = sum(counts)
        return max(0, (total - readers * (p - 1)) // p), -(-(total + readers * (p - 1)) // p)

    def warnings(self):
        shards, p, w = len(self.stream.counts), self.num_processes, max(self.num_workers, 1)
        if shards % p:
            return [f"{shards} shards do not divide over {p} processes: every process reads every shard and keeps 1 "
                    f"sample in {p} ({p} times the reading); use a number of shards divisible by {p}"]
        if (shards // p) % w:
            idle = "sit idle" if shards // p < w else "finish early (one shard fewer than others)"
            return [f"{shards // p} shards per process do not divide over {w} DataLoader workers: some workers {idle}"]
        return []

    def describe(self):
        """One line: what an epoch holds and, for training, how many samples it leaves out."""
        total = len(self.stream)
        if not self.train:
            return (f"{total} samples in {len(self.stream.counts)} shards: {self.steps} batches of {self.share} per "
                    f"process, padded")
        left = total - self.steps * self.batch_size
        return (f"{total} samples in {len(self.stream.counts)} shards: {self.steps} batches of {self.batch_size} per "
                f"epoch" + (f"; {left} samples ({left / total:.2%}) left out of each epoch (a different set each "
                            "epoch), so that every process takes the same number of steps" if left else ""))

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return self.batches(self.epoch)

    def epoch_batches(self, accelerator, state, epoch, epochs):
        """What mrl.loop.epoch_batches returns for a DataLoader: the batches of `epoch` still to train on (after a
        resume, from state.batch_in_epoch on) and a progress bar over the whole epoch."""
        progress = tqdm(total=len(self), initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                        disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        return self.batches(epoch, state.batch_in_epoch), progress

    def batches(self, epoch, start=0):
        """This process's batches of `epoch` from batch `start` on (a mid-epoch resume: the first `start` batches'
        samples are read but not decoded)."""
        self.stream.transform.epoch = epoch  # the workers copy the transform when they start
        self.rows.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            _Chunks(self.stream, self.rows, self.share, start), batch_size=None, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", worker_init_fn=ignore_signals_in_worker)
        chunks, pending, to_skip = iter(loader), [], start * self.share
        if self.train:
            self.begin()
        try:
            for b in range(start, self.steps):
                rows = 0
                while rows < self.share:
                    chunk = next(chunks, None)
                    if chunk is None:
                        break
                    if to_skip:  # a resume: the samples of the batches already trained on
                        chunk, to_skip = self._skip(chunk, to_skip)
                        if chunk is None:
                            continue
                    pending.append(chunk)
                    rows += chunk["rows"]
                batch, pending = _take(pending, self.share)
                if batch["rows"] < self.share and self.train:
                    raise UserError(f"the stream of {self.stream.shards[0]}, ... ended after {b} of {self.steps} "
                                    "batches: a shard changed after it was counted? (its count is cached by size "
                                    "and modification time)")
                self.end_of_dataloader = b == self.steps - 1
                yield self._to_device(self._fill(batch))
        finally:
            if self.train:
                self.end()
            del chunks

    def _skip(self, chunk, to_skip):
        """Drop up to `to_skip` rows from the front of a chunk; returns the rest (or None) and what is left to skip."""
        n = min(chunk["rows"], to_skip)
        if n == chunk["rows"]:
            return None, to_skip - n
        if "pixel_values" not in chunk:
            raise RuntimeError("a chunk counted as skipped holds samples to train on")
        return _slice(chunk, n), 0

    def _fill(self, batch):
        """The batch in Collate's format: unreadable slots filled (training: the next readable sample of the batch;
        evaluation: a zero image labelled -1), evaluation padded to a whole batch the same way."""
        n, readable, labels = batch["rows"], batch["readable"], batch["labels"]
        unreadable = batch["unreadable"]
        if not readable.any():  # no image to fill with: an empty batch (the loop stops with one line) or padding
            if self.train:
                return {"pixel_values": torch.empty(0), "labels": torch.empty(0, dtype=torch.long),
                        "skipped": torch.tensor(len(unreadable)), "unreadable": unreadable}
            pixels = _apply(self._blank(), lambda p: p.expand(self.share, *p.shape).clone())
            return {"pixel_values": pixels, "labels": torch.full((self.share,), -1, dtype=torch.long),
                    "skipped": torch.tensor(len(unreadable)), "unreadable": unreadable}
        position = torch.cumsum(readable, 0) - 1  # row -> its place among the readable rows
        if self.train:
            good = readable.nonzero().flatten()
            after = good[torch.searchsorted(good, torch.arange(n) + 1) % len(good)]  # next readable, wrapping
            source = torch.where(readable, torch.arange(n), after)
            pixels = _apply(batch["pixel_values"], lambda p: p[position[source]])
            labels = labels[source]
        else:
            pad = self.share - n
            mask = torch.cat([readable, torch.zeros(pad, dtype=torch.bool)])
            index = torch.cat([position, torch.zeros(pad, dtype=torch.long)]).clamp(min=0)

            def masked(p):
                return p[index] * mask.view(-1, *[1] * (p.dim() - 1)).to(p.dtype)

            pixels = _apply(batch["pixel_values"], masked)
            labels = torch.where(mask, torch.cat([labels, torch.zeros(pad, dtype=labels.dtype)]), -1)
        return {"pixel_values": pixels, "labels": labels.long(), "skipped": torch.tensor(len(unreadable)),
                "unreadable": unreadable}

    def _blank(self):
        """A zero sample shaped as the transform's output (for a padding batch with no image to copy the shape of)."""
        sample = self.stream.transform.transform(Image.new("RGB", (64, 64)))
        views = self.stream.transform.views
        return torch.zeros_like(sample) if views == 1 else [torch.zeros_like(sample)] * views

    def _to_device(self, batch):
        if self.device.type == "cpu":
            return batch
        move = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return {**batch, "pixel_values": _apply(batch["pixel_values"], move), "labels": move(batch["labels"])}


def _take(chunks, n):
    """The first n rows of a list of chunks as one batch (fewer when the stream ended), and the rest."""
    taken, rows, rest = [], 0, []
    for k, chunk in enumerate(chunks):
        if rows + chunk["rows"] <= n:
            taken.append(chunk)
            rows += chunk["rows"]
            continue
        if rows < n:
            taken.append(_slice(chunk, 0, n - rows))
            rest.append(_slice(chunk, n - rows))
            rows = n
        else:
            rest.append(chunk)
    if len(taken) == 1:
        return taken[0], rest
    pixels = [c["pixel_values"] for c in taken if c["pixel_values"] is not None]
    views = pixels and not torch.is_tensor(pixels[0])
    joined = ([torch.cat(v) for v in zip(*pixels)] if views else torch.cat(pixels)) if pixels else None
    return {"rows": rows, "pixel_values": joined, "labels": torch.cat([c["labels"] for c in taken]) if taken
            else torch.empty(0, dtype=torch.long), "readable": torch.cat([c["readable"] for c in taken]) if taken
            else torch.empty(0, dtype=torch.bool), "unreadable": sum((c["unreadable"] for c in taken), [])}, rest


def _slice(chunk, start, stop=None):
    """Rows [start, stop) of a decoded chunk (its pixels hold its readable rows only)."""
    stop = chunk["rows"] if stop is None else stop
    readable = chunk["readable"]
    first, last = int(readable[:start].sum()), int(readable[:stop].sum())
    pixels = chunk["pixel_values"]
    pixels = None if pixels is None or first == last else _apply(pixels, lambda p: p[first:last])
    names = chunk["unreadable"]  # in row order: the unreadable rows' names, one each
    skipped_before, skipped_in = start - first, (stop - start) - (last - first)
    return {"rows": stop - start, "pixel_values": pixels, "labels": chunk["labels"][start:stop],
            "readable": readable[start:stop], "unreadable": names[skipped_before:skipped_before + skipped_in]}
