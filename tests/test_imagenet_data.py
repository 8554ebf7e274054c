"""ImageNet's sources (an ILSVRC folder, the Hub's parquet layout, webdataset shards) on the tiny ImageNet of
imagenet_fixture: the same images with the same synset-index labels from each, the stream split over processes and
workers, its resume, and one clear line for each bad input."""

import hashlib
import json
import os
import shutil
from collections import Counter
from datetime import timedelta

import httpx
import pytest
import torch
import torchvision.transforms as T

import datasets
from mrl import UserError
from mrl.batches.streams import StreamLoader
from mrl.batches.transforms import ImageTransform, build_transform
from mrl.data.imagenet import synsets
from mrl.data.shards import ShardedStream, sample_index
from mrl.data.sources import load_splits

HALF = (0.5, 0.5, 0.5)


def eval_transform():
    return ImageTransform(build_transform("resized_crop_flip", 32, HALF, HALF, train=False))


def digest(pixels):
    return hashlib.sha1(pixels.numpy().tobytes()).hexdigest()[:16]


def map_pairs(split):
    """(pixel digest, label) of a map-style split's readable images, and how many are unreadable."""
    split.set_transform(eval_transform())
    rows = [split[i] for i in range(len(split))]
    return (Counter((digest(r["pixel_values"]), r["label"]) for r in rows if r["pixel_values"] is not None),
            sum(r["pixel_values"] is None for r in rows))


def stream_pairs(stream, processes=1, num_workers=0):
    """The same for a stream's evaluation batches over all `processes`; also the batch count of each process."""
    stream.set_transform(eval_transform())
    pairs, unreadable, batches = Counter(), 0, []
    for rank in range(processes):
        loader = StreamLoader(stream, 4, train=False, num_processes=processes, process_index=rank,
                              num_workers=num_workers, log=lambda line: None)
        batches.append(0)
        for batch in loader:
            batches[-1] += 1
            assert len(batch["labels"]) == 4 // processes  # padded to whole batches
            pairs.update((digest(p), int(y)) for p, y in zip(batch["pixel_values"], batch["labels"]) if y >= 0)
            unreadable += int(batch["skipped"])
        assert batches[-1] == len(loader)
    return pairs, unreadable, batches


def test_the_three_sources_give_the_same_images_with_synset_index_labels(tiny_imagenet):
    folder, parquet, shards = (load_splits("imagenet", str(p))
                               for p in (tiny_imagenet.folder, tiny_imagenet.parquet, tiny_imagenet.shards))
    for splits in (folder, parquet, shards):
        assert splits.class_names == list(synsets()) and splits.test is None
        assert (len(splits.train), len(splits.val)) == (20, 8)
    assert isinstance(shards.train, ShardedStream)
    train, val = map_pairs(folder.train), map_pairs(folder.val)
    # the labels are the synsets' places among the 1,000 classes, not 0..3
    assert sorted({label for _, label in train[0]}) == list(tiny_imagenet.labels)
    assert train[1] == 1 and val[1] == 0 and sum(train[0].values()) == 19  # the truncated JPEG
    assert map_pairs(parquet.train) == train and map_pairs(parquet.val) == val
    stream_train, stream_val = stream_pairs(shards.train), stream_pairs(shards.val)
    assert stream_train[:2] == train and stream_val[:2] == val
    # grayscale, CMYK, a PNG named .JPEG and the EXIF-rotated image decode to 3 channels like the others
    assert all(folder.train[i]["pixel_values"].shape == (3, 32, 32) for i in range(len(folder.train))
               if folder.train[i]["pixel_values"] is not None)


def test_the_exif_orientation_is_applied(tiny_imagenet):
    from PIL import Image

    from mrl.batches.decode import open_image

    path = next(tiny_imagenet.folder.glob(f"train/{tiny_imagenet.synsets[3]}/*_00.JPEG"))
    stored = Image.open(path).size
    assert open_image({"bytes": None, "path": str(path)}).size == stored[::-1]  # rotated by 90 degrees


def stream_epoch(loader, epoch):
    """The digests of a training epoch's samples on one process, and how many of its slots were refilled."""
    samples, skipped, batches = [], 0, 0
    for batch in loader.batches(epoch):
        batches += 1
        samples += [digest(p) for p in batch["pixel_values"]]
        skipped += int(batch["skipped"])
    assert batches == len(loader)
    return samples, skipped


def deterministic(stream):
    stream.set_transform(ImageTransform(T.Compose([T.Resize((8, 8)), T.PILToTensor()]), seed=0))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_processes_share_an_epoch_without_overlap_and_take_the_same_number_of_steps(tiny_imagenet, num_workers):
    everything = {digest(p) for p, _ in _all_images(tiny_imagenet)}
    assert len(everything) == 19  # one image is unreadable
    for path, whole in ((tiny_imagenet.shards, True), (tiny_imagenet.uneven, False)):
        stream = load_splits("imagenet", str(path)).train
        deterministic(stream)
        warnings = []
        loaders = [StreamLoader(stream, 4, train=True, seed=0, num_processes=2, process_index=rank,
                                num_workers=num_workers, log=warnings.append) for rank in (0, 1)]
        assert len(loaders[0]) == len(loaders[1]) > 0
        orders = []
        for epoch in (0, 1):
            (a, skipped_a), (b, skipped_b) = (stream_epoch(loader, epoch) for loader in loaders)
            assert len(a) == len(b) == 2 * len(loaders[0])
            assert not set(a) & set(b)  # no sample on both processes
            assert set(a) | set(b) <= everything
            if whole:  # 4 shards of 5 over 2 processes: every sample once (the unreadable one's slot refilled)
                assert set(a) | set(b) == everything and skipped_a + skipped_b == 1
            orders.append(a)
        assert orders[0] != orders[1]  # reshuffled each epoch
        if whole:
            assert warnings == []  # 2 shards per process, over 1 or 2 workers
        else:  # 3 shards over 2 processes: each reads all and keeps 1 sample in 2 (said by each loader, i.e. once
            # per process; the scripts print the main process's)
            assert len(warnings) == 2 and "do not divide over 2 processes" in warnings[0]


def _all_images(tiny):
    splits = load_splits("imagenet", str(tiny.folder))
    deterministic(splits.train)
    samples = (splits.train[i] for i in range(len(splits.train)))
    return [(s["pixel_values"], s["label"]) for s in samples if s["pixel_values"] is not None]


def test_evaluation_stream_on_two_processes_covers_every_image_once_padded_to_equal_batches(tiny_imagenet):
    val = load_splits("imagenet", str(tiny_imagenet.uneven)).val  # one shard: both processes read it, 1 in 2 each
    pairs, _, batches = stream_pairs(val, processes=2, num_workers=1)
    assert batches[0] == batches[1] and sum(pairs.values()) == 8
    assert pairs == stream_pairs(val)[0]


def test_stream_resumes_mid_epoch_with_the_batches_of_the_uninterrupted_run(tiny_imagenet):
    stream = load_splits("imagenet", str(tiny_imagenet.shards)).train
    stream.set_transform(ImageTransform(build_transform("resized_crop_flip", 16, HALF, HALF, train=True), seed=3))
    loader = StreamLoader(stream, 4, train=True, seed=1, num_workers=2)
    full = list(loader.batches(1))
    resumed = list(loader.batches(1, start=2))
    assert len(full) == len(loader) == 5 and len(resumed) == 3
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(full[0]["pixel_values"], list(loader.batches(0))[0]["pixel_values"])


class CountingTransform(ImageTransform):
    def __call__(self, batch):
        self.decoded += len(batch["image"])
        return super().__call__(batch)


def test_resume_reads_the_skipped_samples_without_decoding_them(tiny_imagenet):
    stream = load_splits("imagenet", str(tiny_imagenet.shards)).train
    transform = CountingTransform(T.Compose([T.Resize((8, 8)), T.ToTensor()]), seed=0)
    transform.decoded = 0
    stream.set_transform(transform)
    loader = StreamLoader(stream, 4, train=True, num_workers=0)  # decoded in this process, where we count
    assert len(list(loader.batches(0, start=3))) == 2
    assert transform.decoded == 20 - 3 * 4


def test_the_last_batch_of_an_epoch_ends_the_accumulation_group(tiny_imagenet):
    stream = load_splits("imagenet", str(tiny_imagenet.shards)).train
    deterministic(stream)
    loader = StreamLoader(stream, 8, train=True)
    ends = [loader.gradient_state.end_of_dataloader for _ in loader]
    assert ends == [False, True]  # 20 samples: 2 batches of 8, 4 left out
    assert "4 samples (20.00%) left out" in loader.describe()


def stream_worker(rank, path, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + os.getppid() % 1000))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    stream = load_splits("imagenet", path).train
    deterministic(stream)
    # no DataLoader workers: under mp.spawn they would be spawned too, importing everything again (the workers'
    # share of the shards is tested in one process above)
    loader = StreamLoader(stream, 4, train=True, num_processes=2, process_index=rank, num_workers=0,
                          log=lambda line: None)
    seen = []
    for batch in loader:
        step = torch.ones(1)
        dist.all_reduce(step)  # a process with fewer batches would leave the other waiting here
        seen += [digest(p) for p in batch["pixel_values"]]
    results[rank] = seen
    dist.destroy_process_group()


def test_two_real_processes_stream_in_step(tiny_imagenet):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(stream_worker, args=(str(tiny_imagenet.shards), results), nprocs=2, join=True)
    assert len(results[0]) == len(results[1]) == 10 and not set(results[0]) & set(results[1])
    assert len(set(results[0]) | set(results[1])) == 19


def copy(tiny, name, tmp_path):
    return shutil.copytree(getattr(tiny, name), tmp_path / name)


def one_line(path, match):
    with pytest.raises(UserError, match=match) as error:
        load_splits("imagenet", str(path))
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_folders_give_one_clear_line(tiny_imagenet, tmp_path):
    folder = copy(tiny_imagenet, "folder", tmp_path)
    (folder / "train" / synsets()[3]).mkdir()
    one_line(folder, "class folder .*n01491361 is empty")
    os.rmdir(folder / "train" / synsets()[3])
    (folder / "train" / "cats").mkdir()
    one_line(folder, "cats is not an ImageNet class folder")
    shutil.rmtree(folder / "train" / "cats")
    for image in list((folder / "val").glob("*/*.JPEG")):  # ILSVRC's own flat validation folder
        image.rename(folder / "val" / image.name)
    one_line(folder, "val holds image files .* instead of one subfolder per synset")


def test_bad_shards_and_labels_give_one_clear_line(tiny_imagenet, tmp_path):
    shards = copy(tiny_imagenet, "shards", tmp_path)
    shard = shards / "imagenet-train-0002.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    assert "imagenet-train-0002.tar" in one_line(shards, "truncated")

    import io
    import tarfile

    shards = copy(tiny_imagenet, "uneven", tmp_path)
    with tarfile.open(shards / "imagenet-train-0001.tar", "a") as tar:
        info = tarfile.TarInfo("extra.cls")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"1000"))
    one_line(shards, "holds label 1000, outside the 1000 classes")

    parquet = copy(tiny_imagenet, "parquet", tmp_path)
    rows = datasets.Dataset.from_dict({"image": [{"bytes": b"x", "path": "x.JPEG"}], "label": [1000]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))
    rows.to_parquet(str(parquet / "data" / "validation-00000-of-00001.parquet"))
    one_line(parquet, "validation split has labels outside the 1,000 classes")


@pytest.mark.parametrize("status, advice", [(401, "log in with `hf auth login`"),
                                            (403, "accept the terms at https://huggingface.co/datasets/ILSVRC/")])
def test_the_gated_hub_dataset_says_what_to_do(monkeypatch, status, advice):
    from huggingface_hub.errors import GatedRepoError

    from mrl.utils import hub_access

    def gated(*args, **kwargs):  # what datasets raises for ILSVRC/imagenet-1k without a token or without the terms
        response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/datasets/x"))
        try:
            raise GatedRepoError("Cannot access gated repo", response=response)
        except GatedRepoError as e:
            raise datasets.exceptions.DatasetNotFoundError("Dataset 'ILSVRC/imagenet-1k' is a gated dataset") from e

    monkeypatch.setattr(hub_access, "require_hub", lambda what, hint=None: None)
    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(UserError, match=advice.replace("(", r"\(").replace(")", r"\)")) as error:
        load_splits("imagenet")
    assert "\n" not in str(error.value)


def test_sample_index_is_stable_and_distinct():
    assert sample_index("a.tar/k1") == sample_index("a.tar/k1") != sample_index("a.tar/k2")
    assert 0 <= sample_index("b.tar/k1") < 2**63


def test_a_parquet_copy_labelled_by_synset_ids_keeps_their_class_indices(tiny_imagenet, tmp_path):
    # a copy holding some classes, whose ClassLabel names are synset ids: mapped to their places among the 1,000
    source = load_splits("imagenet", str(tiny_imagenet.parquet))
    names = list(tiny_imagenet.synsets)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    (tmp_path / "data").mkdir()
    for split, hub_name in ((source.train, "train"), (source.val, "validation")):
        rows = {"image": split["image"], "label": [names.index(synsets()[y]) for y in split["label"]]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(tmp_path / "data" / f"{hub_name}-00000-of-00001.parquet"))
    subset = load_splits("imagenet", str(tmp_path))
    assert subset.train["label"] == source.train["label"] and subset.val["label"] == source.val["label"]
    assert sorted(set(subset.train["label"])) == list(tiny_imagenet.labels)


def test_shards_that_do_not_divide_over_the_workers_are_said_once(tiny_imagenet):
    stream = load_splits("imagenet", str(tiny_imagenet.shards)).train
    deterministic(stream)
    warnings = []
    StreamLoader(stream, 4, train=True, num_workers=3, num_processes=2, log=warnings.append)
    assert warnings == ["warning: 2 shards per process do not divide over 3 DataLoader workers: some workers sit idle"]


def test_an_info_file_gives_the_shard_counts_without_reading_the_shards(tiny_imagenet, tmp_path):
    from mrl.data.shards import shard_counts

    shards = copy(tiny_imagenet, "uneven", tmp_path)
    names = [f"imagenet-train-{i:04d}.tar" for i in range(3)]
    (shards / "_info.json").write_text(json.dumps({"splits": {"train": {"filenames": names,
                                                                        "shard_lengths": [7, 7, 6]}}}))
    assert shard_counts([str(shards / n) for n in names]) == [{"samples": n, "labels": None} for n in (7, 7, 6)]
    one_line(shards, "_info.json gives no sample count for imagenet-validation-0000.tar")
