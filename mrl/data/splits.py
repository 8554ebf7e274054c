"""What a dataset becomes: train / validation / test splits (Splits), and the record of how they were made -- the
one that config.json keeps, so that evaluation rebuilds the very splits a run trained on (split_record)."""

import hashlib
from dataclasses import dataclass

import numpy as np

import datasets
from mrl.data.presets import get_preset


@dataclass
class Splits:
    train: datasets.Dataset
    val: datasets.Dataset
    test: datasets.Dataset | None  # None when --test_fraction 0 and the source has no test split (the blog)
    class_names: list
    dropped: int = 0  # rows removed by the minimum-size filter (corrupt images included)
    unlabeled: datasets.Dataset | None = None  # a source's `unlabeled` split (STL-10), label -1; for pre-training only
    record: dict | None = None  # how to rebuild these splits exactly, and what they hold (see split_record)


def make_record(name, path, seed, *, val_fraction, test_fraction, min_image_size, max_train_samples,
                max_eval_samples, source, origin, sizes, train_digest, **more):
    """The split record of a Splits (what config.json's data.splits holds): the flags that rebuild the splits, what
    the source held (`source`), which source split each split's rows come from (`origin`), their sizes and a digest
    of the training rows; `more`: what a kind of source adds (webdataset: "format")."""
    return {"dataset": name, "dataset_path": path, "seed": seed, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "min_image_size": min_image_size, "max_train_samples": max_train_samples,
            "max_eval_samples": max_eval_samples, **more, "source": source, "origin": origin, "sizes": sizes,
            "train_digest": train_digest}


def index_digest(dataset):
    """A short digest of the source rows a split holds (its `index` column, in any order)."""
    return hashlib.sha256(np.sort(np.asarray(dataset["index"], dtype=np.int64)).tobytes()).hexdigest()[:16]


SPLIT_FLAGS = ("dataset", "dataset_path", "seed", "val_fraction", "test_fraction", "min_image_size",
               "max_train_samples", "max_eval_samples")


def split_record(config):
    """The split record of a run's config.json (its "data" block), also for runs saved before it held one (their
    settings were in "args"; the minimum image size was then the preset's unless a flag set it)."""
    data, args = config["data"], config.get("args") or {}
    if "splits" in data:
        return data["splits"]
    record = {key: data.get(key, args.get(key)) for key in SPLIT_FLAGS}
    if record["min_image_size"] is None:
        record["min_image_size"] = get_preset(record["dataset"]).min_image_size
    return record
