"""The embedding store embed.py writes and searches: embeddings.parquet (metadata columns and one L2-normalized
prefix column `embedding_<d>` per dim, a `datasets` dataset in Parquet), the faiss index over a small prefix that a
search shortlists with, and embed.json, which says what was built (the model, the source, the dims, the index)."""

import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from mrl import UserError

EMBEDDINGS, MANIFEST = "embeddings.parquet", "embed.json"
INDEX_TYPES = ("flat", "hnsw")


class EmbeddingWriter:
    """Writes embeddings.parquet (metadata columns + one L2-normalized prefix column per dim), the faiss index and
    embed.json from gathered batches, CHUNK_ROWS rows at a time: a collection of any size is written with a
    chunk's worth of memory (a Parquet row group each, added to the index as it is written)."""

    CHUNK_ROWS = 8192

    def __init__(self, output_dir, checkpoint, metadata, class_names, dims, index_dim=None, index_type="flat",
                 origin=None):
        self.output_dir, self.checkpoint, self.metadata, self.class_names = output_dir, checkpoint, metadata, class_names
        self.dims, self.index_dim, self.index_type, self.origin = dims, index_dim, index_type, origin
        self.total = len(metadata[next(iter(metadata))])
        self.written = np.zeros(self.total, dtype=bool)
        self.pending, self.pending_rows, self.parquet, self.index = [], 0, None, None
        os.makedirs(output_dir, exist_ok=True)
        if index_dim is not None:
            self.index = new_index(index_dim, index_type)

    def add(self, features, positions):
        self.pending.append((features, positions))
        self.pending_rows += len(positions)
        if self.pending_rows >= self.CHUNK_ROWS:
            self.flush()

    def flush(self):
        if not self.pending_rows:
            return
        features = torch.cat([f for f, _ in self.pending])
        kept = torch.cat([p for _, p in self.pending]).tolist()
        self.pending, self.pending_rows = [], 0
        self.written[kept] = True
        columns = {name: pa.array([values[i] for i in kept]) for name, values in self.metadata.items()}
        for d in self.dims:
            prefix = F.normalize(features[:, :d].float(), dim=1).numpy()
            columns[f"embedding_{d}"] = pa.FixedSizeListArray.from_arrays(pa.array(prefix.reshape(-1)), d)
            if self.index is not None and d == self.index_dim:
                self.index.add(prefix)
        table = pa.table(columns)
        if self.parquet is None:
            schema = datasets.Features.from_arrow_schema(table.schema)
            if self.class_names is not None:  # the label column keeps its class names in the file's features
                schema["label"] = datasets.ClassLabel(names=list(self.class_names))
            self.schema = schema.arrow_schema
            self.parquet = pq.ParquetWriter(os.path.join(self.output_dir, EMBEDDINGS), self.schema)
        self.parquet.write_table(table.cast(self.schema))

    def close(self, source, seconds, log):
        self.flush()
        if self.parquet is None:
            raise UserError(f"none of the {self.total} images could be read (corrupt or empty files?)")
        self.parquet.close()
        kept = int(self.written.sum())
        unreadable = np.flatnonzero(~self.written).tolist()
        skipped = len(unreadable)
        columns = [*self.metadata, *(f"embedding_{d}" for d in self.dims)]
        checkpoint = os.path.abspath(self.checkpoint) if os.path.isdir(self.checkpoint) else self.checkpoint
        manifest = {"checkpoint": checkpoint,
                    "source": source, "count": kept, "skipped_unreadable": skipped, "dims": self.dims,
                    "columns": columns, "normalized": True, "index": None, "dataset": self.origin}
        if self.index is not None:
            name = f"index_d{self.index_dim}_{self.index_type}.faiss"
            import faiss

            faiss.write_index(self.index, os.path.join(self.output_dir, name))
            manifest["index"] = {"file": name, "dim": self.index_dim, "type": self.index_type,
                                 "rerank_dim": self.dims[-1]}
        with open(os.path.join(self.output_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        metadata = self.metadata
        name = (lambda i: metadata["path"][i]) if "path" in metadata else (  # noqa: E731
            lambda i: f"{metadata['split'][i]}[{metadata['row'][i]}]")
        named = ", ".join(name(i) for i in unreadable[:3]) + (", ..." if skipped > 3 else "")
        log(f"embedded {kept} images in {seconds:.1f} s"
            + (f" ({skipped} unreadable, skipped: {named})" if skipped else "")
            + f"; wrote {os.path.join(self.output_dir, EMBEDDINGS)} (columns {', '.join(columns)})"
            + (f" and a {self.index_type} index over dim {self.index_dim}" if self.index_dim else ""))


def columns_matrix(table, d):
    """The `embedding_<d>` column of a dataset or Arrow table as a float32 tensor (n, d)."""
    column = (table.data.table if isinstance(table, datasets.Dataset) else table).column(f"embedding_{d}")
    return torch.from_numpy(column.combine_chunks().flatten().to_numpy().reshape(-1, d).copy())


def new_index(dim, kind):
    """An empty faiss inner-product index over `dim`-dim vectors: exact (flat) or an HNSW graph."""
    import faiss

    return faiss.IndexFlatIP(dim) if kind == "flat" else faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)


class FaissShortlist:
    """A saved faiss index in the interface mrl.eval.retrieval.funnel_search takes: search(queries, k) -> top-k ids."""

    def __init__(self, path):
        import faiss

        self.index = faiss.read_index(path)

    def search(self, queries, k):
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(128, k)  # the candidate list must hold at least k
        _, ids = self.index.search(queries.float().cpu().numpy(), k)
        ids = torch.from_numpy(ids)
        return torch.where(ids < 0, ids[:, :1], ids)  # -1: a slot HNSW could not fill; repeat the best hit
