"""Evaluation at ImageNet scale, on tiny real data: the chunked neighbour search against one matmul, the float16
memory-mapped feature cache (and the earlier format), the probe's stratified subset, and PCA fitted on a sample."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits

import evaluate
from mrl.batches.transforms import ImageTransform, build_transform
from mrl.data.sources import load_splits
from mrl.eval.features import FeatureWriter, load_or_extract, pca, read_cache
from mrl.eval.probe import sklearn_probe, stratified_subset, torch_probe
from mrl.eval.protocols import protocols
from mrl.eval.retrieval import nearest_neighbors, neighbor_metrics, normalized_prefix, prefix_neighbors


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits plus a little noise (no two similarities tie): 1,200 database rows, 597 queries."""
    data = load_digits()
    g = torch.Generator().manual_seed(0)
    x = torch.tensor(data.data, dtype=torch.float32) + 0.01 * torch.randn(len(data.data), 64, generator=g)
    y = torch.tensor(data.target)
    return x[:1200], y[:1200], x[1200:], y[1200:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_search_finds_the_neighbours_of_one_matmul(digits, dtype):
    database, _, queries, _ = (t.to(dtype) if t.is_floating_point() else t for t in digits)
    database, queries = database[:300], queries[:100]
    dims, k = [16, 40, 64], 25  # (the first few pixels are blank: a 4-dim prefix is all near-ties, of noise)
    # chunks smaller than k, and neither size dividing the row counts: the running top-k must merge across chunks
    for database_chunk, query_chunk in ((7, 13), (150, 1024)):
        chunked = prefix_neighbors(queries, database, dims, k, "cpu", database_chunk, query_chunk)
        for d in dims:
            similarity, index = nearest_neighbors(normalized_prefix(queries, d), normalized_prefix(database, d), k)
            assert torch.equal(chunked[d][1], index), (database_chunk, d)
            assert torch.allclose(chunked[d][0], similarity, atol=1e-6)


def test_chunked_neighbor_metrics_equal_the_unchunked(digits):
    database, db_labels, queries, q_labels = digits
    args = (database, db_labels, queries, q_labels, [8, 32, 64], 10, 20, 0.07, (1, 10, 50), "cpu")
    whole = neighbor_metrics(*args, database_chunk=len(database))
    chunked = neighbor_metrics(*args, database_chunk=101)
    assert chunked == whole
    assert whole[-1]["knn"] > 0.9  # digits at 64 pixels: kNN is near perfect, so the equality is not vacuous


def test_feature_writer_streams_float16_to_a_memory_mapped_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 24, generator=g) * 10, torch.randint(0, 5, (n,), generator=g)) for n in (16, 16, 5)]
    stem = str(tmp_path / "cache" / "train-0123")
    writer = FeatureWriter(stem, capacity=40, dim=24)  # 3 rows more than arrive: unreadable images were dropped
    for z, y in batches:
        writer.append(z, y)
    features, labels = writer.finish()
    expected = torch.cat([z for z, _ in batches])
    assert features.dtype == torch.float16 and features.shape == (37, 24)
    assert torch.equal(features, expected.half())
    assert torch.equal(labels, torch.cat([y for _, y in batches]))
    on_disk = np.load(f"{stem}.features.npy", mmap_mode="r")
    assert isinstance(on_disk, np.memmap) and on_disk.shape == (37, 24)  # the exact row count, half the bytes
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["train-0123.features.npy",
                                                                     "train-0123.labels.npy"]  # no temporary left
    again, again_labels = read_cache(stem)
    assert torch.equal(again, features) and torch.equal(again_labels, labels)


def test_feature_writer_widens_to_float32_beyond_float16_range(tmp_path):
    small, large = torch.full((4, 3), 1.1), torch.tensor([[1e6, -2.5, 3.0]])
    writer = FeatureWriter(str(tmp_path / "x"), capacity=5, dim=3)
    writer.append(small, torch.zeros(4, dtype=torch.long))
    writer.append(large, torch.ones(1, dtype=torch.long))
    features, _ = writer.finish()
    assert features.dtype == torch.float32 and "float32" in writer.message
    assert torch.equal(features[:4], small.half().float())  # the rows written before, as they were stored
    assert torch.equal(features[4:], large)
    assert len(list(tmp_path.iterdir())) == 2


def test_load_or_extract_caches_and_reads_both_formats(tmp_path):
    splits = load_splits("digits", val_fraction=0.1, test_fraction=0.1)
    dataset = splits.test
    dataset.set_transform(ImageTransform(build_transform("none", 8, [0.5] * 3, [0.5] * 3, train=False)))
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 12))
    accelerator, lines = Accelerator(cpu=True), []
    stem = str(tmp_path / "features" / "test-abc")
    x, y, from_cache = load_or_extract(accelerator, backbone, dataset, stem, batch_size=64, log=lines.append)
    assert not from_cache and x.dtype == torch.float16 and len(x) == len(dataset) == len(y)
    assert torch.equal(y, torch.tensor(dataset["label"]))
    with torch.no_grad():
        direct = backbone(torch.stack([s["pixel_values"] for s in dataset]))
    assert torch.equal(x, direct.half())
    # the second time from the files (the earlier name, with .pt, finds them too), memory-mapped
    x2, y2, from_cache = load_or_extract(accelerator, None, dataset, stem + ".pt", log=lines.append)
    assert from_cache and torch.equal(x2, x) and torch.equal(y2, y)
    # a cache of the earlier format (one torch.save'd dict of float32 features) still loads
    old = str(tmp_path / "old" / "test-abc")
    (tmp_path / "old").mkdir()
    torch.save({"features": direct, "labels": y}, old + ".pt")
    x3, y3, from_cache = load_or_extract(accelerator, None, dataset, old, log=lines.append)
    assert from_cache and x3.dtype == torch.float32 and torch.equal(x3, direct) and torch.equal(y3, y)
    # without a cache: the same float16 features, in memory
    x4, _, _ = load_or_extract(accelerator, backbone, dataset, None, batch_size=64, log=lines.append)
    assert torch.equal(x4, x)
    assert sum("loaded cached features" in line for line in lines) == 2


def test_stratified_subset_keeps_class_shares():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 150 + [3] * 49 + [4] * 1)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    subset = stratified_subset(labels, 100, seed=0)
    assert len(subset) == 100 and torch.equal(subset, subset.unique())  # sorted, no repeats
    counts = torch.bincount(labels[subset], minlength=5)
    assert counts.tolist() == [50, 30, 15, 5, 0]  # 4.9 rounds up (largest remainder), 0.1 down
    assert torch.equal(stratified_subset(labels, 100, seed=0), subset)
    assert not torch.equal(stratified_subset(labels, 100, seed=1), subset)  # drawn at random within each class
    assert torch.equal(stratified_subset(labels, 1000, seed=0), torch.arange(1000))
    assert torch.equal(stratified_subset(labels, 0, seed=0), torch.arange(1000))


def test_probes_fit_on_the_stated_subset(digits):
    train, y, test, y_test = digits
    full = torch_probe(train, y, test, y_test, [64], 10, device="cpu")[0]
    sub = torch_probe(train.half(), y, test.half(), y_test, [64], 10, device="cpu", max_train_samples=300)[0]
    assert full.train_samples == 1200 and sub.train_samples == 300
    assert 0.8 < sub.accuracy < full.accuracy + 0.02  # a quarter of the data: still far above chance (0.1)
    seed = sklearn_probe(train, y, test, y_test, [8], max_train_samples=300)[0]
    assert seed.train_samples == 300
    args = evaluate.get_args_parser().parse_args(["--checkpoint", "x", "--probe_max_train_samples", "300"])
    assert "stratified random subset of at most 300 train images" in protocols(args)["probe"]


def test_pca_fitted_on_a_sample_and_applied_in_chunks(digits):
    train, _, test, _ = digits
    whole_train, whole_test = pca(train, test)
    chunked_train, chunked_test = pca(train, test, chunk=97)
    assert torch.allclose(chunked_test, whole_test, atol=1e-4) and torch.allclose(chunked_train, whole_train, atol=1e-4)
    sampled_train, _ = pca(train, test, fit_samples=600, chunk=97)
    # The leading 8 axes fitted on half the rows capture nearly all the train variance that the optimal 8 do (and
    # no more: those are optimal), though not the same axes: they come from the sample.
    captured = sampled_train[:, :8].var(0).sum() / whole_train[:, :8].var(0).sum()
    assert 0.97 < captured < 1 + 1e-5 and not torch.allclose(sampled_train, whole_train, atol=1e-2)
    half_train, half_test = pca(train.half(), test.half(), chunk=97)
    assert half_train.dtype == half_test.dtype == torch.float16  # no float32 copy of a float16 split
    assert torch.allclose(half_test[:, :8].float(), whole_test[:, :8], atol=0.1)
