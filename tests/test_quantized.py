"""Shortlist indexes at float32, int8 and binary precision (mrl/eval/quantized.py) against brute-force restatements in
numpy on small random embeddings: the flat indexes are exact, so their results must be the same."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from mrl.eval.quantized import ShortlistIndex, bytes_per_image, quantized_retrieval, sign_bits
from mrl.eval.retrieval import funnel_search, normalized_prefix
from mrl.report.plots import pareto


@pytest.fixture(scope="module")
def embeddings():
    g = torch.Generator().manual_seed(0)
    database, queries = torch.randn(400, 24, generator=g), torch.randn(30, 24, generator=g)
    return normalized_prefix(database, 24), normalized_prefix(queries, 24)


def brute_force_top(scores, k):
    """Indices of the k highest scores per row, best first (numpy)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_float32_search_is_the_exact_inner_product_search(embeddings):
    database, queries = embeddings
    found = ShortlistIndex(database, "float32").search(queries, 10).numpy()
    assert (found == brute_force_top(queries.numpy() @ database.numpy().T, 10)).all()


def test_int8_search_is_the_inner_product_with_the_8_bit_reconstruction(embeddings):
    """faiss's 8-bit scalar quantizer restated: each dim's [min, max] over the indexed rows (the calibration) in 255
    steps, a value coded as floor(255 x) of its position x in that range and decoded at the step's middle; the query
    stays float32 and is scored against the decoded rows."""
    database, queries = (e.numpy() for e in embeddings)
    low, high = database.min(0), database.max(0)
    position = np.clip((database - low) / (high - low), 0, 1).astype(np.float32)
    codes = np.floor(255 * position)
    decoded = low + (codes + 0.5) / 255 * (high - low)
    expected = brute_force_top(queries @ decoded.T, 10)
    found = ShortlistIndex(embeddings[0], "int8").search(embeddings[1], 10).numpy()
    assert (found == expected).all()
    # and the quantization is coarse enough to matter: the float32 order differs somewhere
    assert (expected != brute_force_top(queries @ database.T, 10)).any()


def test_binary_search_ranks_by_hamming_distance_of_the_sign_bits(embeddings):
    database, queries = (e.numpy() for e in embeddings)
    hamming = ((queries[:, None, :] > 0) != (database[None, :, :] > 0)).sum(-1)
    found = ShortlistIndex(embeddings[0], "binary").search(embeddings[1], 10).numpy()
    # Hamming distances tie often: the distances of what was found are the 10 smallest, in order
    got = np.take_along_axis(hamming, found, axis=1)
    assert (got == np.sort(hamming, axis=1)[:, :10]).all()
    assert sign_bits(database).shape == (400, 3)  # 24 bits: 3 bytes a row
    odd = ShortlistIndex(embeddings[0][:, :12], "binary").search(embeddings[1][:, :12], 5).numpy()  # 12 bits -> 2 bytes
    hamming12 = ((queries[:, None, :12] > 0) != (database[None, :, :12] > 0)).sum(-1)
    assert (np.take_along_axis(hamming12, odd, axis=1) == np.sort(hamming12, axis=1)[:, :5]).all()


def test_reranking_returns_the_full_dim_order_within_the_shortlist(embeddings):
    database, queries = embeddings
    small_db, small_q = normalized_prefix(database, 8), normalized_prefix(queries, 8)
    for precision in ("float32", "int8", "binary"):
        index = ShortlistIndex(small_db, precision)
        shortlist = index.search(small_q, 50)
        found = funnel_search(small_q, small_db, queries, database, 50, 10, index=index)
        for q in range(len(queries)):
            candidates = shortlist[q]
            scores = queries[q] @ database[candidates].T
            assert found[q].tolist() == candidates[scores.argsort(descending=True)[:10]].tolist()


def test_an_index_written_by_another_process_searches_the_same_after_a_reload(embeddings, tmp_path):
    database, queries = embeddings
    torch.save(database, tmp_path / "database.pt")
    for precision in ("float32", "int8", "binary"):
        path = tmp_path / f"{precision}.faiss"
        code = ("import sys, torch; from mrl.eval.quantized import ShortlistIndex; "
                f"ShortlistIndex(torch.load(sys.argv[1]), {precision!r}).save(sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "database.pt"), str(path)], cwd=ROOT, check=True)
        reloaded = ShortlistIndex.load(str(path), precision)
        assert torch.equal(reloaded.search(queries, 10), ShortlistIndex(database, precision).search(queries, 10))


def test_the_measurement_counts_bytes_and_recall_against_the_full_float_search():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 32, generator=g)
    labels = torch.arange(600) % 5
    x = centers[labels] + 0.5 * torch.randn(600, 32, generator=g)
    rows = quantized_retrieval(x[:500], labels[:500], x[500:], labels[500:], dims=[8, 16], rerank_dim=32,
                               shortlist=40, k=10)
    assert {(r["shortlist_dim"], r["precision"]) for r in rows} == {(d, p) for d in (8, 16, 32)
                                                                    for p in ("float32", "int8", "binary")}
    full = next(r for r in rows if r["shortlist_dim"] == 32 and r["precision"] == "float32")
    assert full["recall@10"] == 1.0 and full["bytes_per_image"] == 128  # the reference finds itself
    assert bytes_per_image(16, "int8") == 16 and bytes_per_image(16, "binary") == 2 and bytes_per_image(12, "binary") == 2
    assert all(0 <= r["recall@10"] <= 1 for r in rows)
    front = sorted(pareto(rows, "recall@10"), key=lambda r: r["bytes_per_image"])
    # more bytes on the front buy more recall; every other pair is matched by one on the front for no more bytes
    assert all(a["recall@10"] < b["recall@10"] for a, b in zip(front, front[1:]))
    assert all(any(f["bytes_per_image"] <= r["bytes_per_image"] and f["recall@10"] >= r["recall@10"] for f in front)
               for r in rows)
