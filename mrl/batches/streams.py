"""Batches of webdataset shards (mrl.data.shards.ShardedStream) for each process, as the DataLoader path gives them.

Each process reads its own shards (`split_dataset_by_node`) and within it each DataLoader worker its own (datasets
assigns them), so no process reads what another trains on. Every epoch reshuffles the shard order and a buffer of
samples, seeded by (--seed, epoch).

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
"""

from itertools import count, islice

import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState
from PIL import Image

from datasets.distributed import split_dataset_by_node
from mrl import UserError
from mrl.batches.loaders import EpochLoader
from mrl.utils.script import ignore_signals_in_worker

SHUFFLE_BUFFER = 2000  # samples per worker: about 220 MB of ImageNet JPEGs


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


class StreamLoader(EpochLoader, DataLoaderStateMixin):
    """Batches of a ShardedStream for this process, in the format of mrl.batches.transforms.Collate ({"pixel_values",
    "labels", "skipped", "unreadable"}), on `device`. Not passed to `accelerator.prepare`: it splits the data itself
    (Accelerate would make every process read everything and dispatch batches from the first).

    `batch_size` is the global batch (--batch_size), of which each of the `num_processes` takes an equal share.
    len(): the batches per epoch, the same on every process. Training (`train=True`): shuffled per epoch
    (set_epoch, or the `epoch` of `batches`), cut at the common number of batches, an unreadable image's slot filled
    with the next readable image of its batch (as transforms.FillUnreadable fills it with the next of its split).
    Evaluation: in shard order, every sample once, padded to the common number of batches; unreadable and padding
    slots are zero images labelled -1. As a DeviceLoader, it takes part in Accelerate's gradient-accumulation
    bookkeeping (the last batch of an epoch ends the accumulation group) and is an EpochLoader (mrl.batches.loaders) for mrl.train.loop.
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
