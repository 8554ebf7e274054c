"""The embedding store embed.py writes and searches: embeddings.parquet (metadata columns and one L2-normalized
prefix column `embedding_<d>` per dim, a `datasets` dataset in Parquet), the faiss index over a small prefix that a
search shortlists with (at float32, int8 or binary precision: mrl.eval.quantized), and embed.json, which says what was
built (the model and a digest of its weights, the source, the dims, the index)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

import datasets
from mrl import UserError
from mrl.eval.quantized import ShortlistIndex, bytes_per_image

EMBEDDINGS, MANIFEST = "embeddings.parquet", "embed.json"


class EmbeddingWriter:
    """Writes embeddings.parquet (metadata columns + one L2-normalized prefix column per dim), the faiss index and
    embed.json from gathered batches, CHUNK_ROWS rows at a time: a collection of any size is written with a
    chunk's worth of memory (a Parquet row group each, added to the index as it is written)."""

    CHUNK_ROWS = 8192

    def __init__(self, output_dir, checkpoint, model_digest, metadata, class_names, dims, index_dim=None,
                 index_type="flat", index_precision="float32", origin=None):
        self.output_dir, self.checkpoint, self.metadata, self.class_names = output_dir, checkpoint, metadata, class_names
        self.model_digest, self.dims, self.origin = model_digest, dims, origin
        self.index_dim, self.index_type, self.index_precision = index_dim, index_type, index_precision
        self.total = len(metadata[next(iter(metadata))])
        self.written = np.zeros(self.total, dtype=bool)
        self.pending, self.pending_rows, self.parquet = [], 0, None
        os.makedirs(output_dir, exist_ok=True)

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
        manifest = {"checkpoint": checkpoint, "model_digest": self.model_digest,
                    "source": source, "count": kept, "skipped_unreadable": skipped, "dims": self.dims,
                    "columns": columns, "normalized": True, "index": None, "dataset": self.origin}
        if self.index_dim is not None:  # built from the written column: int8's calibration needs all of it
            d, kind, precision = self.index_dim, self.index_type, self.index_precision
            table = pq.read_table(os.path.join(self.output_dir, EMBEDDINGS), columns=[f"embedding_{d}"])
            index = ShortlistIndex(columns_matrix(table, d), precision, kind)
            name = f"index_d{d}_{kind}_{precision}.faiss"
            index.save(os.path.join(self.output_dir, name))
            manifest["index"] = {"file": name, "dim": d, "type": kind, "precision": precision,
                                 "bytes_per_image": bytes_per_image(d, precision), "index_bytes": index.nbytes(),
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
            + (f" and a {self.index_type} {self.index_precision} index over dim {self.index_dim}"
               if self.index_dim else ""))


def columns_matrix(table, d):
    """The `embedding_<d>` column of a dataset or Arrow table as a float32 tensor (n, d)."""
    column = (table.data.table if isinstance(table, datasets.Dataset) else table).column(f"embedding_{d}")
    return torch.from_numpy(column.combine_chunks().flatten().to_numpy().reshape(-1, d).copy())


def read_store(folder):
    """(embed.json, the embeddings table) of an embed.py --output_dir; one line when it is not one."""
    manifest_file = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise UserError(f"--index {folder} holds no {MANIFEST}: give an --output_dir written by embed.py")
    with open(manifest_file) as f:
        manifest = json.load(f)
    return manifest, pq.read_table(os.path.join(folder, EMBEDDINGS))


def load_shortlist_index(folder, manifest):
    """The store's shortlist index, or None when it was built without one (indexes of earlier versions: float32)."""
    index = manifest.get("index")
    if not index:
        return None
    return ShortlistIndex.load(os.path.join(folder, index["file"]), index.get("precision", "float32"))
