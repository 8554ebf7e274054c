"""Nearest-neighbour evaluation of embedding prefixes: weighted kNN classification, retrieval metrics, and
adaptive (funnel) retrieval.

Queries are the evaluation split, the database is the train split, and an item is relevant to a query when it
has the query's label. Every prefix z[:, :d] is L2-normalized after slicing (`normalized_prefix`), so a dot
product is the cosine similarity; truncating a normalized vector without renormalizing would shrink every
similarity and change the kNN vote weights.

Definitions (per query, averaged over queries):
- kNN top-1 (DINO's eval_knn): the k most similar database items vote for their label with weight
  exp(similarity / T); the prediction is the label with the largest total.
- precision@k: relevant items among the top k, divided by k.
- AP@k (the standard truncated average precision): sum over ranks i <= k of precision@i * rel(i), divided by
  min(k, R), where R is the number of relevant items in the whole database -- a perfect ranking scores 1.
  The MRL paper's code (RAIVNLab/MRL retrieval/compute_metrics.py) divides by k instead, so a query with fewer
  than k relevant items can never reach 1; where every class has at least k database items the two agree.
  Its variant is reported as `map_mrl`.
- top-1 retrieval accuracy: the nearest database item has the query's label (= 1-NN accuracy).

At ImageNet scale the database (1.28M x 2,048: 10.5 GB in float32, half that as the float16 feature cache) does not
go to the device whole: `prefix_neighbors` streams it through in chunks, each moved once in its stored dtype and
converted to float32 there, and keeps a running top-k per query and prefix; it is exact (the same neighbours as
one matmul over the whole database). Adaptive retrieval times searches over a resident index, so it holds the
normalized database at the re-ranking dim (float32) on the device, built chunk by chunk (one copy, not two).
"""

import time

import torch
import torch.nn.functional as F

from mrl import UserError

# Database rows moved to the device at a time, and queries scored against them at a time: a chunk of 65,536 rows
# of 2,048 float16 features is 256 MB (512 MB once float32), a 1,024 x 65,536 block of similarities 256 MB.
DATABASE_CHUNK = 65_536
QUERY_CHUNK = 1_024


def normalized_prefix(x, d):
    """The first d features of each row, L2-normalized (after slicing), as float32."""
    return F.normalize(x[:, :d].float(), dim=1)


def nearest_neighbors(queries, database, k, chunk=1024):
    """(similarity, index), both (m, k): each query's k most similar database rows, most similar first."""
    k = min(k, len(database))
    similarities, indices = [], []
    for start in range(0, len(queries), chunk):
        s, i = (queries[start:start + chunk] @ database.T).topk(k, dim=1)
        similarities.append(s)
        indices.append(i)
    return torch.cat(similarities), torch.cat(indices)


def prefix_neighbors(queries, database, dims, k, device=None, database_chunk=DATABASE_CHUNK, query_chunk=QUERY_CHUNK):
    """{d: (similarity, index)} for every d in dims, both (m, k) on `device`: each query's k most similar database
    rows by cosine on the L2-renormalized prefix, most similar first. The same as nearest_neighbors on
    normalized_prefix(queries, d) and normalized_prefix(database, d), without the database, or a queries x database
    similarity matrix, ever whole on the device: the database streams through `database_chunk` rows at a time,
    each chunk moved once (in its stored dtype, float16 from the cache: half the transfer) and scored at every d,
    and each query keeps a running top-k per d."""
    device = torch.device(device or queries.device)
    k, m = min(k, len(database)), len(queries)
    queries = queries.to(device)
    normalized = {d: normalized_prefix(queries, d) for d in dims}
    best = {d: (torch.full((m, k), -torch.inf, device=device), torch.zeros(m, k, dtype=torch.long, device=device))
            for d in dims}
    for start in range(0, len(database), database_chunk):
        chunk = database[start:start + database_chunk].to(device).float()  # float16 -> float32 on the device
        for d in dims:
            rows, (top_s, top_i) = normalized_prefix(chunk, d), best[d]
            for q in range(0, m, query_chunk):
                s, i = (normalized[d][q:q + query_chunk] @ rows.T).topk(min(k, len(rows)), dim=1)
                s, pos = torch.cat([top_s[q:q + query_chunk], s], 1).topk(k, dim=1)
                top_i[q:q + query_chunk] = torch.cat([top_i[q:q + query_chunk], i + start], 1).gather(1, pos)
                top_s[q:q + query_chunk] = s
    return best


def normalized_database(x, d, device, chunk=DATABASE_CHUNK):
    """normalized_prefix(x, d) on `device`, converted chunk by chunk: only the float32 result is ever whole there."""
    out = torch.empty(len(x), d, device=device)
    for start in range(0, len(x), chunk):
        out[start:start + chunk] = normalized_prefix(x[start:start + chunk].to(device), d)
    return out


def knn_predict(similarity, neighbor_labels, num_classes, k=20, temperature=0.07):
    """Weighted kNN vote over the first k neighbours (DINO's eval_knn): weight exp(similarity / T)."""
    votes = torch.zeros(len(similarity), num_classes, device=similarity.device)
    votes.scatter_add_(1, neighbor_labels[:, :k], (similarity[:, :k] / temperature).exp())
    return votes.argmax(1)


def retrieval_metrics(neighbor_labels, query_labels, database_labels, k):
    """precision@k, mAP@k (standard, divided by min(k, R)), the MRL paper's mAP@k (divided by k) and top-1."""
    relevant = (neighbor_labels[:, :k] == query_labels[:, None]).float()
    k = relevant.shape[1]
    precision_at_rank = relevant.cumsum(1) / torch.arange(1, k + 1, device=relevant.device)
    summed = (precision_at_rank * relevant).sum(1)
    counts = torch.bincount(database_labels, minlength=int(query_labels.max()) + 1)
    n_relevant = counts[query_labels].clamp(max=k).clamp(min=1).float()
    return {"precision": relevant.mean(1).mean().item(), "map": (summed / n_relevant).mean().item(),
            "map_mrl": (summed / k).mean().item(), "top1": relevant[:, 0].mean().item()}


def neighbor_metrics(train_x, train_y, eval_x, eval_y, dims, num_classes, knn_k=20, temperature=0.07,
                     retrieval_ks=(10,), device=None, database_chunk=DATABASE_CHUNK):
    """Per dim: kNN top-1 and, for every k in retrieval_ks, precision@k and mAP@k. One exact neighbour search for
    all dims, with the train features (the database) streamed to the device in chunks (`prefix_neighbors`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_y, eval_y = train_y.to(device), eval_y.to(device)
    depth = max(knn_k, *retrieval_ks)
    neighbors = prefix_neighbors(eval_x, train_x, dims, depth, device, database_chunk)
    results = []
    for d in dims:
        similarity, index = neighbors[d]
        labels = train_y[index]
        row = {"dim": d, "knn": (knn_predict(similarity, labels, num_classes, knn_k, temperature) == eval_y)
               .float().mean().item()}
        for k in retrieval_ks:
            metrics = retrieval_metrics(labels, eval_y, train_y, k)
            row.update({f"precision@{k}": metrics["precision"], f"map@{k}": metrics["map"],
                        f"map_mrl@{k}": metrics["map_mrl"]})
        row["top1"] = (labels[:, 0] == eval_y).float().mean().item()
        results.append(row)
    return results


class HNSWIndex:
    """An approximate inner-product index (faiss's HNSW graph), the kind of index the MRL paper timed adaptive
    retrieval with; for databases too large for exact search. `search` returns top-k indices like exact search.
    Rows must be L2-normalized (inner product = cosine)."""

    def __init__(self, database, neighbors=32, ef_search=128):
        try:
            import faiss
        except ImportError:
            raise UserError("--index hnsw needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
        self.index = faiss.IndexHNSWFlat(database.shape[1], neighbors, faiss.METRIC_INNER_PRODUCT)
        self.ef_search = ef_search
        self.index.add(database.float().cpu().numpy())

    def search(self, queries, k):
        self.index.hnsw.efSearch = max(self.ef_search, k)  # the candidate list must hold at least k
        _, ids = self.index.search(queries.float().cpu().numpy(), k)
        # -1 marks a slot the graph search could not fill (rare, with efSearch >= k): repeat the best hit instead
        ids = torch.from_numpy(ids)
        return torch.where(ids < 0, ids[:, :1], ids).to(queries.device)


def funnel_search(queries_small, database_small, queries_large, database_large, shortlist, k, chunk=256,
                  rerank_chunk=None, index=None):
    """Adaptive retrieval: the `shortlist` nearest by the small prefix, re-ranked by the large one; top-k indices.

    The shortlist comes from one matmul per `chunk` queries (or from `index`, e.g. an HNSWIndex over
    database_small); the re-ranking gathers each query's candidates, `rerank_chunk` queries at a time (default:
    rerank_chunk_size)."""
    shortlist = min(shortlist, len(database_small))
    k = min(k, shortlist)
    rerank_chunk = rerank_chunk or rerank_chunk_size(queries_large.device, chunk)
    out = []
    for start in range(0, len(queries_small), chunk):
        queries = queries_small[start:start + chunk]
        candidates = (index.search(queries, shortlist) if index is not None
                      else (queries @ database_small.T).topk(shortlist, dim=1).indices)
        for sub in range(0, len(candidates), rerank_chunk):
            ids = candidates[sub:sub + rerank_chunk]
            gathered = database_large.index_select(0, ids.flatten()).view(*ids.shape, -1)
            query = queries_large[start + sub:start + sub + len(ids), :, None]
            out.append(ids.gather(1, torch.bmm(gathered, query)[..., 0].topk(k, dim=1).indices))
    return torch.cat(out)


def rerank_chunk_size(device, chunk):
    """Queries re-ranked per batched product: on a CPU a few (8), so that the rows gathered for them stay in cache;
    on an accelerator the whole chunk at once, since every product is a kernel launch whose fixed cost would
    otherwise dominate (hundreds of tiny launches per chunk would time the funnel slower than exact search)."""
    return 8 if torch.device(device).type == "cpu" else chunk


def exact_search(queries, database, k, chunk=256):
    """Brute-force top-k indices (the full-dim baseline that funnel_search is timed against)."""
    return nearest_neighbors(queries, database, k, chunk)[1]


def adaptive_retrieval(train_x, train_y, eval_x, eval_y, shortlist_dims, rerank_dim, shortlist=200, k=10,
                       repeats=3, timing_queries=2000, device=None, index="exact"):
    """Funnel retrieval for each shortlist dim d_s: shortlist with d_s, re-rank with `rerank_dim`.

    Reports its precision@k, mAP@k and top-1 over all queries, and the wall-clock time per query (the median of
    `repeats` timed runs over the first `timing_queries` queries, after the untimed full run), next to a search at
    `rerank_dim` measured the same way. `index="exact"` searches by brute force; "hnsw" shortlists with an HNSW
    index over each d_s prefix and compares with HNSW at `rerank_dim`, as the MRL paper did. Normalizing the
    database prefixes and building the indices is index building and is not timed; normalizing the queries is.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    train_y, eval_y, eval_x = train_y.to(device), eval_y.to(device), eval_x.to(device)
    database_large = normalized_database(train_x, rerank_dim, device)
    timed_queries = eval_x[:timing_queries]

    def run(search):
        """search(queries) on every query (the results), then timed on the timing subset: (results, s/query)."""
        result = search(eval_x)
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            search(timed_queries)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return result, sorted(times)[len(times) // 2] / len(timed_queries)

    if index == "hnsw":
        full_hnsw = HNSWIndex(database_large)
        full_index, full_seconds = run(lambda q: full_hnsw.search(normalized_prefix(q, rerank_dim), k))
    else:
        full_index, full_seconds = run(lambda q: exact_search(normalized_prefix(q, rerank_dim), database_large, k))
    full = retrieval_metrics(train_y[full_index], eval_y, train_y, k)
    rows = [{"shortlist_dim": rerank_dim, "rerank_dim": rerank_dim, "shortlist": None, "ms_per_query":
             1000 * full_seconds, "speedup": 1.0, "flops_ratio": 1.0, **_prefixed(full, k)}]
    n = len(train_x)
    for d in shortlist_dims:
        if d >= rerank_dim:
            continue
        database_small = normalized_database(train_x, d, device)
        small_index = HNSWIndex(database_small) if index == "hnsw" else None
        found, seconds = run(lambda q, d=d, database_small=database_small, small_index=small_index: funnel_search(
            normalized_prefix(q, d), database_small, normalized_prefix(q, rerank_dim), database_large, shortlist, k,
            index=small_index))
        s = min(shortlist, n)
        rows.append({"shortlist_dim": d, "rerank_dim": rerank_dim, "shortlist": s, "ms_per_query": 1000 * seconds,
                     "speedup": full_seconds / seconds, "flops_ratio": (n * rerank_dim) / (n * d + s * rerank_dim),
                     **_prefixed(retrieval_metrics(train_y[found], eval_y, train_y, k), k)})
    return rows


def _prefixed(metrics, k):
    return {f"precision@{k}": metrics["precision"], f"map@{k}": metrics["map"], f"map_mrl@{k}": metrics["map_mrl"],
            "top1": metrics["top1"]}
