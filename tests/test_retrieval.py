"""kNN, retrieval metrics and adaptive retrieval against brute-force computations, on real digits pixels."""

import math

import pytest
import torch
from sklearn.datasets import load_digits

from mrl.eval.retrieval import (
    HNSWIndex,
    adaptive_retrieval,
    exact_search,
    funnel_search,
    knn_predict,
    nearest_neighbors,
    neighbor_metrics,
    normalized_prefix,
    rerank_chunk_size,
    retrieval_metrics,
)

# its module fixtures are built once: all of its tests run on one pytest-xdist worker (pytest.ini)
pytestmark = pytest.mark.xdist_group("test_retrieval")


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits as features: 64 pixel values plus noise, so that no two rows tie in similarity.
    Database: the first 1,200 rows; queries: the rest."""
    data = load_digits()
    g = torch.Generator().manual_seed(0)
    x = torch.tensor(data.data, dtype=torch.float32) + 0.01 * torch.randn(len(data.data), 64, generator=g)
    y = torch.tensor(data.target)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def brute_force_neighbors(queries, database):
    """Every query's database rows sorted by cosine similarity: one query at a time, a full sort, no top-k."""
    out = []
    for q in queries.double():
        sims = database.double() @ q / (database.double().norm(dim=1) * q.norm())
        out.append(sims.argsort(descending=True).tolist())
    return out


def test_prefixes_are_renormalized_after_slicing(digits):
    x = digits[0][:50]
    for d in (8, 17, 64):
        p = normalized_prefix(x, d)
        assert p.shape == (50, d)
        assert torch.allclose(p.norm(dim=1), torch.ones(50), atol=1e-5)  # unit length again, not shrunk
        assert torch.allclose(p, x[:, :d] / x[:, :d].norm(dim=1, keepdim=True), atol=1e-6)


def test_nearest_neighbors_match_brute_force(digits):
    database, _, queries, _ = digits
    database, queries = database[:300], queries[:40]
    d = 16
    expected = brute_force_neighbors(queries[:, :d], database[:, :d])
    similarity, index = nearest_neighbors(normalized_prefix(queries, d), normalized_prefix(database, d), 10, chunk=7)
    assert index.tolist() == [e[:10] for e in expected]
    assert (similarity[:, :-1] >= similarity[:, 1:]).all()


def test_knn_vote_matches_a_hand_computed_weighted_vote(digits):
    database, db_labels, queries, q_labels = digits
    d, k, temperature = 40, 20, 0.07
    db, q = normalized_prefix(database, d), normalized_prefix(queries, d)
    similarity, index = nearest_neighbors(q, db, k)
    predicted = knn_predict(similarity, db_labels[index], 10, k, temperature)
    for i in range(0, len(queries), 37):  # a sample of queries, vote by vote
        ranked = brute_force_neighbors(queries[i:i + 1, :d], database[:, :d])[0][:k]
        votes = [0.0] * 10
        for j in ranked:
            cos = float(queries[i, :d] @ database[j, :d] / (queries[i, :d].norm() * database[j, :d].norm()))
            votes[int(db_labels[j])] += math.exp(cos / temperature)
        assert predicted[i] == max(range(10), key=lambda c: votes[c])
    accuracy = (predicted == q_labels).float().mean().item()
    assert accuracy > 0.85  # 40 of the 64 digits pixels are good kNN features; chance is 0.1


def brute_force_retrieval(ranked_labels, query_label, n_relevant, k):
    """precision@k, AP@k (divided by min(k, R)) and the MRL paper's AP@k (divided by k), for one query."""
    hits, precision_sum = 0, 0.0
    for rank, label in enumerate(ranked_labels[:k], start=1):
        if label == query_label:
            hits += 1
            precision_sum += hits / rank
    return hits / k, precision_sum / max(1, min(k, n_relevant)), precision_sum / k


def test_retrieval_metrics_match_brute_force():
    # class 2 has only 2 database items (< k), so the standard and the MRL paper's mAP@k differ
    database_labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 2)
    query_labels = torch.tensor([0, 1, 2, 2])
    neighbor_labels = torch.tensor([[0, 1, 0, 0, 2], [0, 0, 1, 1, 1], [2, 0, 2, 1, 1], [0, 1, 0, 0, 0]])
    for k in (1, 3, 5):
        metrics = retrieval_metrics(neighbor_labels, query_labels, database_labels, k)
        rows = [brute_force_retrieval(neighbor_labels[i].tolist(), int(query_labels[i]),
                                      int((database_labels == query_labels[i]).sum()), k) for i in range(4)]
        assert metrics["precision"] == pytest.approx(sum(r[0] for r in rows) / 4)
        assert metrics["map"] == pytest.approx(sum(r[1] for r in rows) / 4)
        assert metrics["map_mrl"] == pytest.approx(sum(r[2] for r in rows) / 4)
        assert metrics["top1"] == pytest.approx(0.5)
    # query 2 (class 2, R = 2) ranks both relevant items at 1 and 3: AP@5 = (1/1 + 2/3) / 2, the MRL one / 5
    assert brute_force_retrieval([2, 0, 2, 1, 1], 2, 2, 5)[1:] == pytest.approx(((1 + 2 / 3) / 2, (1 + 2 / 3) / 5))


def test_neighbor_metrics_per_dim_against_brute_force(digits):
    database, db_labels, queries, q_labels = digits
    database, db_labels, queries, q_labels = database[:400], db_labels[:400], queries[:60], q_labels[:60]
    rows = neighbor_metrics(database, db_labels, queries, q_labels, [8, 64], 10, knn_k=5, retrieval_ks=(10,))
    assert [r["dim"] for r in rows] == [8, 64]
    for row, d in zip(rows, (8, 64)):
        ranked = brute_force_neighbors(queries[:, :d], database[:, :d])
        per_query = [brute_force_retrieval(db_labels[r].tolist(), int(q_labels[i]),
                                           int((db_labels == q_labels[i]).sum()), 10) for i, r in enumerate(ranked)]
        assert row["precision@10"] == pytest.approx(sum(p[0] for p in per_query) / 60, abs=1e-6)
        assert row["map@10"] == pytest.approx(sum(p[1] for p in per_query) / 60, abs=1e-6)
        assert row["top1"] == pytest.approx(sum(int(db_labels[r[0]] == q_labels[i]) for i, r in enumerate(ranked)) / 60)
    assert rows[1]["knn"] > 0.8 and rows[1]["map@10"] > 0.8


def test_funnel_search_reranks_the_shortlist(digits):
    database, _, queries, _ = digits
    small_db, small_q = normalized_prefix(database, 8), normalized_prefix(queries, 8)
    large_db, large_q = normalized_prefix(database, 64), normalized_prefix(queries, 64)
    exact = exact_search(large_q, large_db, 10)
    # a shortlist of the whole database is exact search at the large dim
    assert torch.equal(funnel_search(small_q, small_db, large_q, large_db, len(database), 10, chunk=50), exact)
    # a real shortlist: the results are the large-dim best among the small-dim top 50
    funnel = funnel_search(small_q, small_db, large_q, large_db, 50, 10, chunk=64)
    shortlist = exact_search(small_q, small_db, 50)
    for i in range(0, len(queries), 50):
        candidates = shortlist[i]
        best = candidates[(large_db[candidates] @ large_q[i]).argsort(descending=True)[:10]]
        assert funnel[i].tolist() == best.tolist()
    # on an accelerator a whole chunk of queries is re-ranked in one batched product (a CPU takes 8 at a time, for
    # its cache): the same results
    assert rerank_chunk_size("cpu", 64) == 8 and rerank_chunk_size("cuda:0", 64) == rerank_chunk_size("mps", 64) == 64
    assert torch.equal(funnel_search(small_q, small_db, large_q, large_db, 50, 10, chunk=64, rerank_chunk=64), funnel)


def test_adaptive_retrieval_reports_quality_and_time(digits):
    database, db_labels, queries, q_labels = digits
    rows = adaptive_retrieval(database, db_labels, queries, q_labels, [8, 16, 64], 64, shortlist=100, k=10, repeats=1,
                              timing_queries=100)
    full, *funnels = rows
    assert full["shortlist"] is None and full["speedup"] == 1.0
    assert [r["shortlist_dim"] for r in funnels] == [8, 16]  # a shortlist dim >= the re-rank dim is skipped
    exact = neighbor_metrics(database, db_labels, queries, q_labels, [8, 16, 64], 10, retrieval_ks=(10,))
    assert full["map@10"] == pytest.approx(exact[-1]["map@10"], abs=1e-6)
    for r, small in zip(funnels, exact):
        assert r["ms_per_query"] > 0 and r["speedup"] > 0
        assert r["flops_ratio"] == pytest.approx(1200 * 64 / (1200 * r["shortlist_dim"] + 100 * 64))
        assert r["map@10"] > small["map@10"]  # re-ranking at the full dim beats searching with d_s alone


def test_hnsw_index_finds_the_exact_neighbours_and_funnels_like_exact_search(digits):
    database, db_labels, queries, q_labels = digits
    small_db, small_q = normalized_prefix(database, 16), normalized_prefix(queries, 16)
    exact = exact_search(small_q, small_db, 10)
    approximate = HNSWIndex(small_db).search(small_q, 10)
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact)) / exact.numel()
    assert recall > 0.95, recall
    exact_rows = adaptive_retrieval(database, db_labels, queries, q_labels, [8, 16], 64, shortlist=100, k=10,
                                    repeats=1)
    hnsw_rows = adaptive_retrieval(database, db_labels, queries, q_labels, [8, 16], 64, shortlist=100, k=10,
                                   repeats=1, index="hnsw")
    assert [r["shortlist_dim"] for r in hnsw_rows] == [64, 8, 16]
    for e, h in zip(exact_rows, hnsw_rows):
        assert abs(e["map@10"] - h["map@10"]) < 0.02 and h["map@10"] > 0.5  # chance: about 0.1
