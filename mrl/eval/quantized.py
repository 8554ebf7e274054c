"""Shortlist indexes over a Matryoshka prefix at a few bytes per image, and what they cost and find.

Adaptive retrieval shortlists with a small prefix z[:, :d] and re-ranks the shortlist with the full embedding in
float32. The shortlist index can also store its d numbers per image at a lower precision:

  float32  4 d bytes   exact inner product (faiss IndexFlatIP, or an HNSW graph over it)
  int8     d bytes     faiss's 8-bit scalar quantizer: each dim's range [min, max] over the indexed embeddings (the
                       calibration, stored in the index file) cut into 255 steps; queries stay float32
  binary   d / 8 bytes the sign bit of each dim, searched by Hamming distance (faiss IndexBinaryFlat / HNSW), as the
                       vector databases' binary indexes and sentence-transformers' quantize_embeddings do

`quantized_retrieval` measures every (shortlist dim, precision) pair against the full-dim float32 search: the recall@k
of its top-k among that search's top-k, mAP@k, the bytes per image of its codes and the time per query.
"""

import os
import time

import numpy as np
import torch

from mrl import UserError
from mrl.eval.retrieval import exact_search, funnel_search, normalized_database, normalized_prefix, retrieval_metrics

PRECISIONS = ("float32", "int8", "binary")
INDEX_KINDS = ("flat", "hnsw")
BITS = {"float32": 32, "int8": 8, "binary": 1}


def bytes_per_image(dim, precision):
    """What one image's code takes in the shortlist index (without an HNSW graph's links)."""
    return dim * 4 if precision == "float32" else dim if precision == "int8" else -(-dim // 8)


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("a shortlist index needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def sign_bits(x):
    """Rows of sign bits (1 where the value is positive), packed 8 to a byte: the binary codes."""
    return np.packbits(np.asarray(x, dtype=np.float32) > 0, axis=1)


class ShortlistIndex:
    """A faiss index over L2-normalized `vectors` (n, d) at `precision`, exact (`kind` flat) or an HNSW graph;
    `search(queries, k)` -> top-k row indices (a torch tensor), best first, on the queries' device."""

    def __init__(self, vectors, precision="float32", kind="flat", neighbors=32, ef_search=128, index=None):
        if precision not in PRECISIONS or kind not in INDEX_KINDS:
            raise UserError(f"unknown index precision {precision!r} or kind {kind!r}: choose from {PRECISIONS} and "
                            f"{INDEX_KINDS}")
        self.precision, self.kind, self.ef_search = precision, kind, ef_search
        if index is not None:  # loaded from a file
            self.index = index
            return
        faiss = import_faiss()
        x = np.ascontiguousarray(torch.as_tensor(vectors).float().cpu().numpy())
        d = x.shape[1]
        if precision == "binary":
            bits = 8 * -(-d // 8)  # whole bytes: the padding bits are 0 in every code, so they never differ
            self.index = faiss.IndexBinaryFlat(bits) if kind == "flat" else faiss.IndexBinaryHNSW(bits, neighbors)
            self.index.add(sign_bits(x))
            return
        ip = faiss.METRIC_INNER_PRODUCT
        if precision == "float32":
            self.index = faiss.IndexFlatIP(d) if kind == "flat" else faiss.IndexHNSWFlat(d, neighbors, ip)
        else:
            qt = faiss.ScalarQuantizer.QT_8bit
            self.index = (faiss.IndexScalarQuantizer(d, qt, ip) if kind == "flat"
                          else faiss.IndexHNSWSQ(d, qt, neighbors, ip))
            self.index.train(x)  # the calibration: each dim's min and max over the indexed embeddings
        self.index.add(x)

    def __len__(self):
        return self.index.ntotal

    def search(self, queries, k):
        faiss = import_faiss()
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)  # the candidate list must hold at least k
        q = np.ascontiguousarray(queries.float().cpu().numpy())
        if self.precision == "binary":
            _, ids = self.index.search(sign_bits(q), k)
        else:
            faiss.omp_set_num_threads(torch.get_num_threads())
            _, ids = self.index.search(q, k)
        ids = torch.from_numpy(ids)
        # -1 marks a slot an HNSW search could not fill (rare, with efSearch >= k): repeat the best hit instead
        return torch.where(ids < 0, ids[:, :1], ids).to(queries.device)

    def save(self, path):
        faiss = import_faiss()
        (faiss.write_index_binary if self.precision == "binary" else faiss.write_index)(self.index, path)

    @classmethod
    def load(cls, path, precision="float32"):
        """The index saved at `path` (embed.json records its precision; float32 for indexes of earlier versions)."""
        faiss = import_faiss()
        if not os.path.isfile(path):
            raise UserError(f"the index file {path} is missing: embed the images again")
        index = (faiss.read_index_binary if precision == "binary" else faiss.read_index)(path)
        return cls(None, precision, "hnsw" if hasattr(index, "hnsw") else "flat", index=index)

    def nbytes(self):
        """The index's size in memory as faiss serializes it (codes, calibration, graph links)."""
        faiss = import_faiss()
        serialize = faiss.serialize_index_binary if self.precision == "binary" else faiss.serialize_index
        return int(serialize(self.index).nbytes)


def quantized_retrieval(train_x, train_y, eval_x, eval_y, dims, rerank_dim, precisions=PRECISIONS, shortlist=200,
                        k=10, kind="flat", timing_queries=1000):
    """For every shortlist dim d < rerank_dim (and d = rerank_dim itself) and precision: shortlist `shortlist` train
    images by the d-dim prefix's index at that precision, re-rank them by the rerank_dim prefix in float32. Returns one
    row each: recall@k of the full-dim float32 search's top-k, mAP@k (same label), bytes per image, the index's size
    and its time per query (the median of 3 timed searches of the first `timing_queries` queries)."""
    database_full = normalized_database(train_x, rerank_dim, "cpu")
    queries_full = normalized_prefix(eval_x.float(), rerank_dim)
    k = min(k, len(train_x))
    exact = exact_search(queries_full, database_full, k)  # what a full-dim float32 search returns
    rows = []
    for d in sorted({*[d for d in dims if d < rerank_dim], rerank_dim}):
        database_small, queries_small = normalized_database(train_x, d, "cpu"), normalized_prefix(eval_x.float(), d)
        for precision in precisions:
            index = ShortlistIndex(database_small, precision, kind)
            s = min(shortlist, len(train_x))

            def search(queries_small, queries_full):
                return funnel_search(queries_small, database_small, queries_full, database_full, s, k, index=index)

            found = search(queries_small, queries_full)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                search(queries_small[:timing_queries], queries_full[:timing_queries])
                times.append((time.perf_counter() - start) / min(timing_queries, len(queries_small)))
            recall = (found[:, :, None] == exact[:, None, :]).any(-1).float().mean().item()
            metrics = retrieval_metrics(train_y[found], eval_y, train_y, k)
            rows.append({"shortlist_dim": d, "precision": precision, "bytes_per_image": bytes_per_image(d, precision),
                         "shortlist": s, f"recall@{k}": recall, f"map@{k}": metrics["map"],
                         "ms_per_query": 1000 * sorted(times)[1], "index_bytes": index.nbytes(),
                         "images": len(train_x)})
    return rows
