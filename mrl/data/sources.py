"""Where a dataset comes from and how it is split: load_splits, the front door of mrl.data, reads a preset's data
from the Hub, a local copy, an image folder, an ILSVRC folder or webdataset shards (mrl.data.shards), and carves out
the missing validation and test splits, stratified and seeded (mrl.batches decodes, transforms and batches them).

Every dataset, wherever it comes from, is normalized to three columns: `image` (kept undecoded until a sample is
used, so a corrupt file costs one sample, not the run), `label` (a ClassLabel) and `index` (the row's position in
the source, which seeds that sample's random augmentation -- see mrl.batches.transforms.ImageTransform).
"""

import io
import os

import numpy as np
from PIL import Image

import datasets
from mrl import UserError
from mrl.data import imagenet, shards
from mrl.data.presets import get_preset
from mrl.data.splits import Splits, index_digest, make_record
from mrl.utils import hub_access

LABEL_COLUMNS = ("label", "labels", "fine_label")
IMAGE_COLUMNS = ("image", "img")
VALIDATION_SPLITS = ("validation", "valid", "val")
UNLABELED_SPLIT = "unlabeled"
UNLABELED_INDEX_OFFSET = 10**9  # unlabeled rows' `index` (augmentation seed) never collides with a train row's


def load_splits(name, path=None, *, seed=0, val_fraction=0.1, test_fraction=0.1, max_train_samples=None,
                max_eval_samples=None, min_image_size=None):
    """Load dataset `name` (a key of PRESETS) from the Hub, or from `path` when given, as stratified splits.

    A split the source provides (test, validation) is used as is; missing ones are carved out of train,
    stratified by label and seeded. `val_fraction` and `test_fraction` are fractions of the whole train split.
    """
    preset = get_preset(name)
    if name == "imagenet" and path is not None and shards.is_webdataset(path):
        return shards.stream_splits(name, path, imagenet.synsets(), seed=seed, max_train_samples=max_train_samples,
                                    max_eval_samples=max_eval_samples)
    raw = _load_raw(name, preset, path)
    if preset.source_splits:
        raw.pop("test", None)
        if not any(s in raw for s in VALIDATION_SPLITS):
            raise UserError(f"dataset {path or name} has no validation split (it has: {', '.join(raw)})")
        test_fraction = 0.0
    source = {split: {"rows": len(ds), "fingerprint": getattr(ds, "_fingerprint", None)} for split, ds in raw.items()}
    unlabeled = raw.pop(UNLABELED_SPLIT, None)
    raw = {split: _normalize_columns(ds, preset.label_column, split) for split, ds in raw.items()}
    if "train" not in raw:
        raise UserError(f"dataset {path or name} has no 'train' split (it has: {', '.join(raw)})")
    raw = _unify_labels(raw)
    min_size = preset.min_image_size if min_image_size is None else min_image_size
    dropped = 0
    if min_size > 0:
        for split, ds in raw.items():
            raw[split] = ds.filter(_at_least(min_size), batched=True, input_columns=["image"],
                                   desc=f"dropping {split} images under {min_size} px")
            dropped += len(ds) - len(raw[split])

    train, test = raw["train"], raw.get("test")
    val_source = next((s for s in VALIDATION_SPLITS if s in raw), "train")
    val = raw[val_source] if val_source != "train" else None
    if test is None and test_fraction > 0:
        train, test = _stratified_split(train, test_fraction, seed)
    if val is None:
        carved = test_fraction if "test" not in raw else 0.0
        train, val = _stratified_split(train, val_fraction / (1 - carved), seed)
    if max_train_samples:
        train = train.shuffle(seed=seed).select(range(min(max_train_samples, len(train))))
    if max_eval_samples:
        val = val.select(range(min(max_eval_samples, len(val))))
        test = test.select(range(min(max_eval_samples, len(test)))) if test is not None else None
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"dataset {path or name} has too few usable images ({len(train)} train, {len(val)} val)")
    if unlabeled is not None:
        unlabeled = _unlabeled_columns(unlabeled, train.features["label"])
        if max_train_samples:
            unlabeled = unlabeled.shuffle(seed=seed).select(range(min(max_train_samples, len(unlabeled))))
    record = make_record(name, path, seed, val_fraction=val_fraction, test_fraction=test_fraction,
                         min_image_size=min_size, max_train_samples=max_train_samples,
                         max_eval_samples=max_eval_samples, source=source,
                         # the source split each split's rows (and their `index`) come from
                         origin={"train": "train", "val": val_source, "test": "test" if "test" in raw else "train"},
                         sizes={"train": len(train), "val": len(val), "test": len(test) if test is not None else 0},
                         train_digest=index_digest(train))
    return Splits(train, val, test, train.features["label"].names, dropped, unlabeled, record)


def trained_rows(record):
    """The source rows (`index` values of the source's train split) a run trained on, rebuilt from its split
    record; checked against the record's digest, so a split that cannot be reproduced is an error, not a guess."""
    splits = load_splits(record["dataset"], record["dataset_path"], seed=record["seed"],
                         val_fraction=record["val_fraction"], test_fraction=record["test_fraction"],
                         max_train_samples=record["max_train_samples"], min_image_size=record["min_image_size"])
    if record.get("train_digest") not in (None, splits.record["train_digest"]):
        raise UserError(f"cannot rebuild the training split of a run on {record['dataset_path'] or record['dataset']} "
                        f"(seed {record['seed']}): the data or the splitting code changed since it was trained, so its "
                        "training images cannot be told apart from the evaluation images")
    return set(splits.train["index"])


def _load_raw(name, preset, path):
    """The source's splits as a dict of Datasets, with clear errors for the ways loading fails."""
    if name == "digits" and not path:
        return {"train": digits_dataset()}
    if path is None and preset.hub_id is None:
        raise UserError(f"--dataset {name} needs --dataset_path (a local dataset or image folder)")
    source = path or preset.hub_id
    try:
        if path is not None:
            if not os.path.exists(path):
                raise UserError(f"--dataset_path {path} does not exist")
            if name == "imagenet" and imagenet.is_ilsvrc_folder(path):
                return imagenet.folder_splits(path)
            if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
                ds = datasets.load_from_disk(path)
            else:
                ds = datasets.load_dataset(path)
        else:
            hub_access.require_hub(f"download {preset.hub_id}")
            ds = datasets.load_dataset(preset.hub_id)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError...)
        access = imagenet.hub_access_error(e, preset.hub_id) if path is None else None
        if access:  # a gated dataset (ImageNet): no token, or the terms not accepted
            raise UserError(access) from e
        hint = "" if path else f" {hub_access.local_copy_hint()}"
        raise UserError(f"could not load dataset {source}: {hub_access.one_line(e)}.{hint}") from e
    splits = {"train": ds} if isinstance(ds, datasets.Dataset) else dict(ds)
    if name == "imagenet":
        return imagenet.synset_labels(splits)
    train = splits.get("train")
    if path is not None and train is not None and not any(c in LABEL_COLUMNS or isinstance(f, datasets.ClassLabel)
                                                          for c, f in train.features.items()):
        classes = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d)) and d[0] != "."]
        if 0 < len(classes) < 2:  # datasets' imagefolder drops the label column when there is one class
            raise UserError(f"--dataset_path {path} is an image folder with one class subfolder ({classes[0]}); "
                            "classification needs at least two classes, one subfolder each")
    return splits


def digits_dataset():
    """scikit-learn's 1,797 8x8 digit images (values 0..16) as 8-bit grayscale PIL images with labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()}, features=features)


def _normalize_columns(ds, preferred_label, split):
    columns = ds.column_names
    image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    image_col = image_col or next((c for c in IMAGE_COLUMNS if c in columns), None)
    label_candidates = ((preferred_label,) if preferred_label else ()) + LABEL_COLUMNS
    label_col = next((c for c in label_candidates if c in columns), None)
    label_col = label_col or next((c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_col is None or label_col is None:
        missing = "image column" if image_col is None else "label column (label, labels, fine_label or a ClassLabel)"
        raise UserError(f"the {split} split has no {missing} (columns: {', '.join(columns)})")
    ds = ds.select_columns([image_col, label_col])
    ds = ds.rename_columns({c: n for c, n in ((image_col, "image"), (label_col, "label")) if c != n})
    ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds.add_column("index", np.arange(len(ds)))


def _unlabeled_columns(ds, label_feature):
    """An `unlabeled` split as columns image, label (-1: none, typed as train's ClassLabel so that the two concatenate)
    and index (offset past any train index)."""
    image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    image_col = image_col or next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    if image_col is None:
        raise UserError(f"the {UNLABELED_SPLIT} split has no image column (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns([image_col]).cast_column(image_col, datasets.Image(decode=False))
    ds = ds.rename_columns({image_col: "image"}) if image_col != "image" else ds
    ds = ds.add_column("label", np.full(len(ds), -1, dtype=np.int64), feature=label_feature)
    return ds.add_column("index", np.arange(len(ds), dtype=np.int64) + UNLABELED_INDEX_OFFSET)


def _unify_labels(splits):
    """Give every split the same ClassLabel; plain int or string labels are mapped to one sorted vocabulary."""
    features = {name: ds.features["label"] for name, ds in splits.items()}
    if all(isinstance(f, datasets.ClassLabel) for f in features.values()):
        names = {tuple(f.names) for f in features.values()}
        if len(names) > 1:
            raise UserError("the dataset's splits have different class names: " + "; ".join(map(str, names)))
        return splits
    values = sorted(set().union(*(set(ds.unique("label")) for ds in splits.values())))
    label = datasets.ClassLabel(names=[str(v) for v in values])
    mapping = {v: i for i, v in enumerate(values)}
    return {name: ds.map(lambda b: {"label": [mapping[v] for v in b["label"]]}, batched=True,
                         features=datasets.Features({**ds.features, "label": label}), desc=f"encoding {name} labels")
            for name, ds in splits.items()}


def _stratified_split(ds, fraction, seed):
    try:
        parts = ds.train_test_split(test_size=fraction, stratify_by_column="label", seed=seed)
    except ValueError as e:
        raise UserError(f"cannot split {len(ds)} images into a {fraction:.0%} stratified part: {e}") from None
    return parts["train"], parts["test"]


def _at_least(min_size):
    """load_splits' minimum-size filter: reads each image's header only, without decoding it."""
    def keep(items):
        sizes = []
        for item in items:
            try:  # reads the header only
                with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
                    sizes.append(min(image.size))
            except Exception:
                sizes.append(0)
        return [s >= min_size for s in sizes]
    return keep
