"""--data_on_device (mrl/batches/device_data.py): the batches, views and resume of the DataLoader path, without workers.

On real tiny data (scikit-learn's digits at 8 px): the device batches are exactly what Accelerate's prepared
DataLoader gives each process (every sample once per epoch, unreadable images left out), the decoded-image cache is
reused and invalidated when it should be, and train_ssl.py trains with --data_on_device loss for loss as with
--gpu_augment, and resumes mid-epoch exactly.
"""

import os
import re
import shutil

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.state import AcceleratorState, GradientState
from conftest import folder_with_unreadable_images, run_script
from safetensors.torch import load_file

import datasets
import train_ssl
from mrl.batches.device_data import CACHE_FOLDER, DeviceLoader, cached_decode, decode_transform, decoded_cache_key
from mrl.batches.ssl_augment import BatchAugment, batch_seed
from mrl.batches.transforms import Collate, FillUnreadable, ImageTransform
from mrl.data.presets import PRESETS
from mrl.data.sources import load_splits
from mrl.train import loop

# its module fixtures are built once: all of its tests run on one pytest-xdist worker (pytest.ini)
pytestmark = pytest.mark.xdist_group("test_device_data")

SIZE = 8


@pytest.fixture(scope="module")
def digits():
    """400 images of the digits train split, three of them unreadable (as a corrupt file in a real dataset)."""
    train = load_splits("digits", seed=0, max_train_samples=400).train
    bad = {5, 100, 300}
    return train.map(lambda row, i: {"image": {"bytes": b"not an image", "path": None}} if i in bad else row,
                     with_indices=True)


def dataloader_batches(dataset, batch_size, processes, process, epoch, seed=0):
    """What train_ssl.py's --gpu_augment DataLoader yields on one of `processes` processes in `epoch`: Accelerate's
    seedable sampler, split_batches, drop_last; each image decoded and resized as its workers do."""
    dataset = dataset.with_transform(ImageTransform(decode_transform(SIZE), seed=seed))
    loader = torch.utils.data.DataLoader(FillUnreadable(dataset), batch_size=batch_size, shuffle=True, drop_last=True,
                                         collate_fn=Collate())
    loader = prepare_data_loader(loader, num_processes=processes, process_index=process, split_batches=True,
                                 use_seedable_sampler=True, data_seed=seed)
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("processes", [1, 2])
def test_device_batches_are_the_dataloader_batches_of_every_process(digits, tmp_path, processes):
    arrays = cached_decode(digits, SIZE, cache_dir=tmp_path, log=lambda *a: None)
    assert int((~arrays[2]).sum()) == 3  # the unreadable images are marked, not dropped from the array
    batch_size, skipped = 32, 0
    for process in range(processes):
        device = DeviceLoader(*arrays, batch_size, seed=0, device="cpu", num_processes=processes, process_index=process)
        assert len(device) == len(digits) // batch_size == 12
        for epoch in (0, 1):
            expected = dataloader_batches(digits, batch_size, processes, process, epoch)
            got = list(device.batches(epoch))
            assert len(got) == len(expected) == 12
            for a, b in zip(got, expected):
                assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
                assert a["skipped"] == int(b["skipped"])
                skipped += a["skipped"]
            rest = list(device.batches(epoch, start=7))  # a resume after 7 batches: the rest of the epoch
            assert len(rest) == 5 and all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(rest, got[7:]))
            assert not torch.equal(got[0]["labels"], next(device.batches(epoch + 1))["labels"])  # a new order
    assert skipped > 0  # some unreadable image was drawn, and its slot filled as FillUnreadable fills it


def test_each_sample_appears_once_per_epoch_across_two_processes(digits, tmp_path):
    # label the rows by their position, so that the batches name the samples they hold
    images, labels, readable = cached_decode(digits, SIZE, cache_dir=tmp_path, log=lambda *a: None)
    rows = np.arange(len(labels))
    drawn = []
    for process in (0, 1):
        loader = DeviceLoader(images, rows, np.ones_like(readable), 32, 3, "cpu", num_processes=2, process_index=process)
        drawn += [i for batch in loader.batches(epoch=4) for i in batch["labels"].tolist()]
    assert len(drawn) == len(set(drawn)) == 384  # 12 global batches of 32: no sample twice


def test_the_same_seeds_give_the_same_views_as_gpu_augment(digits, tmp_path):
    arrays = cached_decode(digits, SIZE, cache_dir=tmp_path, log=lambda *a: None)
    preset = PRESETS["digits"]
    augment = BatchAugment(SIZE, preset.mean, preset.std)
    device_batch = next(DeviceLoader(*arrays, 32, 0, "cpu").batches(epoch=2))
    loader_batch = dataloader_batches(digits, 32, 1, 0, epoch=2)[0]
    views = []
    for batch in (device_batch, loader_batch):
        generator = torch.Generator().manual_seed(batch_seed(0, 2, 0, 0))
        views.append(torch.stack([augment(batch["pixel_values"], generator), augment(batch["pixel_values"], generator)]))
    assert torch.equal(views[0], views[1]) and views[0].std() > 0.3


def test_the_decoded_cache_is_reused_and_keyed_by_split_seed_and_size(tmp_path):
    messages = []
    train = load_splits("digits", seed=0, max_train_samples=200).train
    first = cached_decode(train, SIZE, cache_dir=tmp_path, log=messages.append)
    second = cached_decode(train, SIZE, cache_dir=tmp_path, log=messages.append)
    assert messages[0].startswith("decoded 200 images") and messages[1].startswith("decoded images: read from")
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    # the pixels are those the --gpu_augment workers make: RGB (the digits are grayscale), resized
    assert first[0].shape == (200, 3, SIZE, SIZE) and np.array_equal(first[0][:, 0], first[0][:, 2])
    row = {"image": [train[7]["image"]], "label": [train[7]["label"]], "index": [7]}
    expected = ImageTransform(decode_transform(SIZE))(row)["pixel_values"][0]
    assert np.array_equal(first[0][7], expected.numpy()) and first[1][7] == train[7]["label"]
    keys = {decoded_cache_key(train, SIZE), decoded_cache_key(train, 16),
            decoded_cache_key(load_splits("digits", seed=1, max_train_samples=200).train, SIZE),
            decoded_cache_key(load_splits("digits", seed=0, max_train_samples=201).train, SIZE),
            decoded_cache_key(load_splits("digits", seed=0, val_fraction=0.2, max_train_samples=200).train, SIZE)}
    assert len(keys) == 5
    # a damaged cache file is decoded again, not trusted
    folder = tmp_path / CACHE_FOLDER / decoded_cache_key(train, SIZE)
    (folder / "images.npy").write_bytes(b"truncated")
    third = cached_decode(train, SIZE, cache_dir=tmp_path, log=messages.append)
    assert "cannot be read" in messages[2] and np.array_equal(third[0], first[0])
    assert np.array_equal(np.load(folder / "images.npy"), first[0])  # and rewritten


def run_main(argv, losses):
    """train_ssl.main in this process, recording every forward pass's loss."""
    args = train_ssl.get_args_parser().parse_args([str(a) for a in argv])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    step = loop.training_step

    def recording(*a, **k):
        result = step(*a, **k)
        losses.append(result[0].item())
        return result

    loop.training_step = recording
    try:
        train_ssl.main(args)
    finally:
        loop.training_step = step
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# 48 images in batches of 16: 3 batches per epoch, accumulated by 2, so each epoch ends with an incomplete group that
# still steps (2 optimizer steps per epoch); the checkpoint at step 3 is mid-way through epoch 2.
RUN = ["--dataset", "digits", "--image_size", SIZE, "--num_workers", 0, "--method", "simclr", "--batch_size", 16,
       "--max_train_samples", 48, "--max_eval_samples", 16, "--knn_every", 0, "--grad_accum_steps", 2, "--epochs", 2,
       "--checkpointing_steps", 3, "--report_to", "none", "--lr", 2e-3]


def test_train_ssl_on_device_matches_gpu_augment_loss_for_loss_and_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    workers, device, resumed = [], [], []
    run_main([*RUN, "--gpu_augment", "--output_dir", tmp_path / "workers"], workers)
    run_main([*RUN, "--data_on_device", "--output_dir", tmp_path / "device"], device)
    assert len(device) == 6 and all(np.isfinite(device))
    assert device == workers  # the same batches and views, bit for bit
    assert len(os.listdir(tmp_path / "cache" / CACHE_FOLDER)) == 1
    checkpoint = tmp_path / "device" / "checkpoints" / "step_00000003"  # after batch 2 of epoch 2
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint.name)
    run_main([*RUN, "--data_on_device", "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", "latest"],
             resumed)
    assert resumed == device[-1:]
    a, b = load_file(tmp_path / "device" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_on_device_train_as_the_dataloader_path(tmp_path):
    """DDP on two CPU processes (gloo): each process draws its half of every global batch on the device (the first
    decodes, the other reads its cache), and the run ends with the weights of the --gpu_augment DataLoader run. One
    image in 5 is unreadable: each fills its slot with the same image on both paths, so every process's share of a
    batch keeps its size (SimCLR gathers the embeddings of every process: with unequal shares it failed)."""
    folder = folder_with_unreadable_images(tmp_path / "imgs")
    common = ["--dataset", "custom", "--dataset_path", folder, "--image_size", SIZE, "--num_workers", 0, "--method",
              "simclr", "--batch_size", 16, "--max_train_samples", 48, "--max_eval_samples", 16, "--knn_every", 0,
              "--epochs", 1]
    env = {"HF_DATASETS_CACHE": str(tmp_path / "cache")}
    workers = run_script("train_ssl.py", *common, "--gpu_augment", "--output_dir", tmp_path / "workers",
                         tmp_path=tmp_path, processes=2, env=env)
    result = run_script("train_ssl.py", *common, "--data_on_device", "--output_dir", tmp_path / "device",
                        tmp_path=tmp_path, processes=2, env=env)
    assert "2 process(es)" in result.stdout and result.stdout.count("decoded 48 images") == 1
    replaced = [re.search(r"(\d+) unreadable images replaced", r.stdout) for r in (workers, result)]
    assert all(replaced) and replaced[0].group(1) == replaced[1].group(1)
    assert len(os.listdir(tmp_path / "cache" / CACHE_FOLDER)) == 1  # one copy, no temporary folder left
    a, b = load_file(tmp_path / "workers" / "model.safetensors"), load_file(tmp_path / "device" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
