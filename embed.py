#!/usr/bin/env python
"""Embed your own images with a trained run, at the prefix sizes you choose, and search them.

Embedding: every image of a folder (or of a dataset split) goes through the run's backbone once, with the run's own
preprocessing; each chosen prefix z[:, :d] is L2-renormalized and written as the column `embedding_<d>` of a
`datasets` dataset in Parquet (<output_dir>/embeddings.parquet), beside the image's path (or its split, row and
label). With --index_dim, a faiss index over that small prefix is written too, and a search shortlists with it and
re-ranks the shortlist with the largest dim written: MRL's adaptive retrieval, the funnel evaluate.py measures.
Every Accelerate process embeds its shard of the images; the main process writes the files.

Searching: `--query IMAGE ... --index <output_dir>` embeds the query images with the same run and prints their
nearest images with cosine similarities (at the re-ranking dim). It also draws them (--grid, a PNG): each query and its
nearest images at a few prefix sizes (--grid_dims), one row per d, so that what a small prefix gets wrong is seen.

examples:
  python embed.py --checkpoint runs/supervised_mrl_digits_resnet18 --images photos/ --dims 16,512 --index_dim 16
  python embed.py --index runs/supervised_mrl_digits_resnet18/embeddings --query photos/cat.jpg --top_k 5
  python embed.py --checkpoint user/mrl-resnet18 --dataset cifar10 --dataset_path ../shared/data/cifar10 --split test
  accelerate launch --multi_gpu embed.py --checkpoint runs/ssl_relic_cifar10_resnet18 --images photos/ \\
      --output_dir runs/photos
(photos/ stands for your folder of images, searched recursively)
"""

import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import datasets
from mrl import UserError
from mrl.batches.decode import open_image
from mrl.batches.transforms import Collate, FillUnreadable, ImageTransform
from mrl.data.presets import PRESETS
from mrl.data.sources import load_splits
from mrl.eval.features import embedded_batches, state_digest
from mrl.eval.quantized import INDEX_KINDS, PRECISIONS
from mrl.eval.retrieval import funnel_search, nearest_neighbors, normalized_prefix
from mrl.eval.retrieval_grid import default_grid_dims, ranked_blocks, split_thumbnails
from mrl.hub.embedding_store import MANIFEST, EmbeddingWriter, columns_matrix, load_shortlist_index, read_store
from mrl.matryoshka import evaluation_dims, flat_dims, parse_dims
from mrl.pretrained import MatryoshkaEncoder, list_images
from mrl.report.plots import Thumb, retrieval_grid
from mrl.utils import script
from mrl.utils.distributed import make_accelerator

GRID = "search_grid.png"
GRID_MAX_QUERIES = 16  # queries drawn in the grid (the picture grows a block of rows per query)


def get_args_parser():
    parser = script.ArgumentParser("embed.py", description=__doc__)
    parser.add_argument("--checkpoint", default=None,
                        help="the trained model: a run folder or a Hub model id (user/name). Default when searching: "
                             "the one the index was built with")
    group = parser.add_argument_group("what to embed (one of --images, --dataset)")
    group.add_argument("--images", default=None, help="a folder of images (searched recursively; any format PIL reads)")
    group.add_argument("--dataset", default=None, choices=list(PRESETS),
                       help="a dataset preset instead of a folder; its splits are the run's when it trained on it")
    group.add_argument("--dataset_path", default=None,
                       help="with --dataset: a local copy (the Hub's parquet layout, save_to_disk, an image folder)")
    group.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                       help="with --dataset: which split to embed")
    group = parser.add_argument_group("embeddings and index")
    group.add_argument("--dims", type=parse_dims, nargs="+", default=None,
                       help="prefix sizes to write, e.g. 16,512 (default: the dims the run trained, which end at the "
                            "full embedding)")
    group.add_argument("--index_dim", type=int, default=None,
                       help="also build a faiss index over this (small) prefix; searches shortlist with it and re-rank "
                            "at the largest of --dims (added to --dims when missing)")
    group.add_argument("--index_type", default="flat", choices=INDEX_KINDS,
                       help="flat: exact search over the small prefix; hnsw: an approximate HNSW graph, for "
                            "collections too large for exact search")
    group.add_argument("--index_precision", default="float32", choices=PRECISIONS,
                       help="how the index stores each image's --index_dim numbers: float32 (4 bytes each); int8 (1 "
                            "byte: faiss's scalar quantizer, calibrated on the indexed embeddings); binary (1 bit: "
                            "the signs, searched by Hamming distance). The shortlist is re-ranked in float32 at the "
                            "largest dim either way; evaluate.py measures what each (dim, precision) pair finds")
    group.add_argument("--output_dir", default=None,
                       help="where embeddings.parquet, the index and embed.json go (default: <checkpoint>/embeddings "
                            "for a run folder, embeddings_<model name> for a Hub model)")
    group.add_argument("--overwrite", action="store_true", help="replace the embeddings already in --output_dir")
    group.add_argument("--batch_size", type=int, default=256, help="images per forward pass and process")
    group.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="DataLoader worker processes per process (image decoding)")
    group = parser.add_argument_group("search")
    group.add_argument("--query", nargs="+", default=None,
                       help="image files (or folders) to search for in --index; prints their nearest images")
    group.add_argument("--index", default=None, help="an --output_dir written by this script, to search in")
    group.add_argument("--top_k", type=int, default=5, help="results per query")
    group.add_argument("--shortlist", type=int, default=200,
                       help="candidates the small-prefix index returns for re-ranking at the full dim")
    group.add_argument("--grid", default=None,
                       help=f"where the picture of the results goes (PNG): each query, then its --top_k nearest "
                            f"images at each of --grid_dims, one row per d, the similarity under each (the first "
                            f"{GRID_MAX_QUERIES} queries). Default: {GRID} in --index; 'none': no picture")
    group.add_argument("--grid_dims", type=parse_dims, nargs="+", default=None,
                       help="the prefix sizes drawn, one row each, ranked by cosine on the L2-renormalized prefix "
                            "(default: the smallest dim the model trained, a middle one and the full dim, e.g. "
                            "8,64,512). The full dim's row is the printed results")
    return parser


def main(args):
    check_args(args)
    if args.query:
        search(args)
    else:
        build(args)


def check_args(args):
    for name in ("batch_size", "top_k", "shortlist"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.query:
        if not args.index:
            raise UserError("--query needs --index: a folder written by embed.py (its --output_dir)")
        return
    if args.index:
        raise UserError("--index is for searching: give --query IMAGE too (or --output_dir to write embeddings)")
    if (args.images is None) == (args.dataset is None):
        raise UserError("give one of --images FOLDER or --dataset NAME to embed")
    if args.images is not None and not os.path.isdir(args.images):
        raise UserError(f"--images {args.images} is not a folder")
    if args.checkpoint is None:
        raise UserError("--checkpoint is required: the run folder or Hub model to embed with")


# ---- embedding

def build(args):
    accelerator = make_accelerator()
    log = accelerator.print
    with accelerator.main_process_first():  # a Hub model is downloaded once, by the main process
        model = MatryoshkaEncoder.from_pretrained(args.checkpoint, device=accelerator.device)
    dims = resolve_dims(args, model)
    output_dir = args.output_dir or default_output_dir(args.checkpoint)
    if os.path.isfile(os.path.join(output_dir, MANIFEST)) and not args.overwrite:
        raise UserError(f"{output_dir} already holds embeddings; pass --overwrite to replace them, or another "
                        "--output_dir")

    # ---- the images: a dataset of undecoded image cells whose `label` is the row's position, so that the rows the
    # processes gather back (unreadable images dropped) say which images they are
    with accelerator.main_process_first():
        rows, metadata, class_names, source, origin = image_rows(args, model.config)
    rows.set_transform(ImageTransform(model.preprocess))
    loader = torch.utils.data.DataLoader(FillUnreadable(rows, evaluation=True), batch_size=args.batch_size,
                                         shuffle=False, num_workers=args.num_workers, collate_fn=Collate(),
                                         pin_memory=torch.cuda.is_available())
    log(f"embedding {len(rows)} images from {source} with {args.checkpoint} at dims {dims}, "
        f"{accelerator.num_processes} process(es)")
    start = time.perf_counter()
    loader = accelerator.prepare(loader)
    # every process embeds its shard; the main process writes the gathered rows as they come, a chunk at a time
    writer = (EmbeddingWriter(output_dir, args.checkpoint, state_digest(model.backbone), metadata, class_names, dims,
                              args.index_dim, args.index_type, args.index_precision, origin)
              if accelerator.is_main_process else None)
    for features, positions in embedded_batches(accelerator, model.backbone, tqdm(
            loader, desc="embedding", dynamic_ncols=True, disable=not accelerator.is_local_main_process)):
        if writer is not None:
            writer.add(features, positions)
    if writer is not None:
        writer.close(source, time.perf_counter() - start, log)
    accelerator.end_training()


def resolve_dims(args, model):
    """The dims to store: --dims, or the model's head dims and its full width; and --index_dim, which must not be
    above the largest of --dims (the re-ranking dim)."""
    given = flat_dims(args.dims)
    if args.index_dim is not None and given and args.index_dim > max(given):
        raise UserError(f"--index_dim {args.index_dim} is above the largest of --dims ({max(given)}), which "
                        "re-ranks the shortlist")
    return evaluation_dims(args.dims, model.embed_dim, default=[*model.dims, model.embed_dim],
                           also=[args.index_dim] if args.index_dim is not None else [], name="--dims and --index_dim",
                           whose="the model's embedding dim")


def default_output_dir(checkpoint):
    if os.path.isdir(checkpoint):
        return os.path.join(checkpoint, "embeddings")
    return "embeddings_" + checkpoint.rstrip("/").split("/")[-1]


def image_rows(args, config):
    """(rows to embed, their metadata columns, class names or None, a description of the source, and for a dataset
    the load_splits arguments that give its splits again -- a search shows its images -- else None)."""
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64"),
                                  "index": datasets.Value("int64")})
    if args.images is not None:
        paths = list_images(args.images)
        positions = np.arange(len(paths))
        rows = datasets.Dataset.from_dict({"image": [{"path": p, "bytes": None} for p in paths], "label": positions,
                                           "index": positions}, features=features)
        return rows, {"path": paths}, None, args.images, None
    # a dataset: the run's own splits (seed and fractions from its config) when it trained on this dataset
    data = config.get("data") or {}
    same = args.dataset == data.get("dataset")
    origin = {"name": args.dataset, "path": args.dataset_path or (data.get("dataset_path") if same else None),
              "seed": data.get("seed", 0) if same else 0,
              "val_fraction": data.get("val_fraction", 0.1) if same else 0.1,
              "test_fraction": data.get("test_fraction", 0.1) if same else 0.1}
    splits = origin_splits(origin)
    names = ("train", "val", "test") if args.split == "all" else (args.split,)
    parts = [(name, getattr(splits, name)) for name in names if getattr(splits, name) is not None]
    if not parts:
        raise UserError(f"dataset {args.dataset} has no {args.split} split here (try --split val)")
    metadata = {"split": [name for name, ds in parts for _ in range(len(ds))],
                "row": [i for _, ds in parts for i in ds["index"]],
                "label": [y for _, ds in parts for y in ds["label"]]}
    images = datasets.concatenate_datasets([ds.select_columns(["image"]) for _, ds in parts])
    positions = np.arange(len(images))
    rows = images.add_column("label", positions).add_column("index", positions).cast(features)
    return rows, metadata, splits.class_names, f"{args.dataset} ({', '.join(name for name, _ in parts)})", origin


# ---- searching

def search(args):
    manifest, table = read_store(args.index)
    index = manifest.get("index")
    full_dim = index["rerank_dim"] if index else max(manifest["dims"])
    grid_dims = check_grid_dims(args, full_dim)
    model = MatryoshkaEncoder.from_pretrained(args.checkpoint or manifest["checkpoint"])
    built_with = manifest.get("model_digest")  # None: a store of an earlier version, which did not record it
    if args.checkpoint and built_with and state_digest(model.backbone) != built_with:
        raise UserError(f"--index {args.index} holds embeddings of {manifest['checkpoint']}; --checkpoint "
                        f"{args.checkpoint} is another model, whose queries would be compared in another space: drop "
                        "--checkpoint, or embed the images again with it")
    # by default three of the dims the model trained, up to the searched embedding's
    grid_dims = grid_dims or default_grid_dims([d for d in model.dims if d <= full_dim] + [full_dim])
    queries = [p for q in args.query for p in (list_images(q) if os.path.isdir(q) else [q])]
    missing = [q for q in queries if not os.path.isfile(q)]
    if missing:
        raise UserError(f"--query {missing[0]} is not a file")
    database = columns_matrix(table, full_dim)
    k = min(args.top_k, len(database))
    # one forward pass for every prefix the search and the grid use
    encoded = model.encode(queries, dim=sorted({full_dim, *grid_dims, *([index["dim"]] if index else [])}),
                           batch_size=args.batch_size)
    if index:  # shortlist by the small prefix's index, re-rank at the full dim (mrl.eval.retrieval's funnel)
        shortlist = min(args.shortlist, len(database))
        ids = funnel_search(encoded[index["dim"]], columns_matrix(table, index["dim"]), encoded[full_dim], database,
                            shortlist, k, index=load_shortlist_index(args.index, manifest))
        how = (f"shortlist of {shortlist} by dim {index['dim']} ({index['type']} {index.get('precision', 'float32')} "
               f"faiss index), re-ranked at dim {full_dim}")
    else:
        ids = nearest_neighbors(encoded[full_dim], database, k)[1]
        how = f"exact search at dim {full_dim}"
    scores = torch.einsum("qd,qkd->qk", encoded[full_dim], database[ids])
    names = item_names(table)
    print(f"nearest of {len(database)} images ({how}):")
    for query, row_ids, row_scores in zip(queries, ids.tolist(), scores.tolist()):
        print(f"query {query}")
        for rank, (i, score) in enumerate(zip(row_ids, row_scores), 1):
            print(f"  {rank:>3}  {score:.4f}  {names[i]}")
    if args.grid != "none":
        write_grid(args, manifest, table, queries, encoded, database, (scores, ids), grid_dims, k, how)


def check_grid_dims(args, full_dim):
    """--grid_dims, sorted; None when not given."""
    if args.grid_dims is None:
        return None
    dims = sorted({d for group in args.grid_dims for d in group})
    if not dims or dims[0] < 1 or dims[-1] > full_dim:
        raise UserError(f"--grid_dims must lie in 1..{full_dim} (the largest dim in --index), got {dims}")
    return dims


def write_grid(args, manifest, table, queries, encoded, database, results, grid_dims, k, how):
    """The results as a picture: each query, then its k nearest images at each d of grid_dims (one row each, by
    cosine on the L2-renormalized prefix: mrl.eval.retrieval's nearest_neighbors, as the search ranks). The full dim's
    row is the printed results, funnel included."""
    shown = queries[:GRID_MAX_QUERIES]
    full_dim = database.shape[1]
    rankings = {}
    for d in grid_dims:
        if d == full_dim:
            scores, ids = results
            rankings[f"d = {d}" + ("\n(funnel)" if manifest.get("index") else "")] = (scores[:len(shown)],
                                                                                      ids[:len(shown)])
        else:
            rankings[f"d = {d}"] = nearest_neighbors(encoded[d][:len(shown)], normalized_prefix(database, d), k)
    labels = item_labels(table)  # a dataset's class names, else the file names
    paths = table.column("path").to_pylist() if labels is None else None

    def caption(i):
        return labels[i] if labels is not None else os.path.basename(paths[i])[:16]

    blocks = ranked_blocks([Thumb(open_image({"path": q, "bytes": None}), f"query\n{os.path.basename(q)[:16]}")
                            for q in shown], rankings, database_thumbnails(manifest, table), caption)
    path = args.grid or os.path.join(args.index, GRID)
    try:
        retrieval_grid(blocks, path, title=f"nearest of {len(database)} images by cosine on each prefix d\n"
                                           f"d = {full_dim}: {how}")
    except OSError as e:
        raise UserError(f"cannot write the grid to {path} ({e.strerror or e}): pass --grid PATH, or --grid none")
    more = f", the first {len(shown)} of {len(queries)} queries" if len(shown) < len(queries) else ""
    print(f"wrote the results as a picture: {path} (rows d = {', '.join(map(str, grid_dims))}{more})")


def origin_splits(origin):
    """The splits of the dataset an index was built from, as embed.json records it ("dataset")."""
    return load_splits(origin["name"], origin["path"], seed=origin["seed"], val_fraction=origin["val_fraction"],
                       test_fraction=origin["test_fraction"])


def database_thumbnails(manifest, table):
    """thumbnail(i): embedded image i, from its file or from the dataset split it was embedded from (loaded again
    with the arguments embed.json records); None where it cannot be read -- the grid then shows an empty cell."""
    if "path" in table.column_names:
        paths = table.column("path").to_pylist()
        return lambda i: open_image({"path": paths[i], "bytes": None})
    origin = manifest.get("dataset")
    if origin is None:  # embed.json from before it recorded the dataset
        return lambda i: None
    try:
        splits = origin_splits(origin)
    except UserError as e:  # e.g. a Hub dataset offline: the grid still shows the scores and classes
        print(f"the grid shows no images: {e}")
        return lambda i: None
    split, row = table.column("split").to_pylist(), table.column("row").to_pylist()
    readers = {}  # split -> (thumbnail by position, position of each source row)

    def thumbnail(i):
        if split[i] not in readers:
            dataset = getattr(splits, split[i])
            readers[split[i]] = split_thumbnails(dataset), {r: p for p, r in enumerate(dataset["index"])}
        read, position = readers[split[i]]
        return read(position[row[i]])

    return thumbnail


def item_labels(table):
    """Each embedded image's class name, None for a folder of images (no labels)."""
    if "label" not in table.column_names:
        return None
    label = datasets.Features.from_arrow_schema(table.schema)["label"]
    name = label.int2str if isinstance(label, datasets.ClassLabel) else str
    return [name(y) for y in table.column("label").to_pylist()]


def item_names(table):
    """How each embedded image is named in the results: its path, or split[row] and its class."""
    if "path" in table.column_names:
        return table.column("path").to_pylist()
    return [f"{split}[{row}] label {y}" for split, row, y in
            zip(table.column("split").to_pylist(), table.column("row").to_pylist(), item_labels(table))]


if __name__ == "__main__":
    script.run(main, get_args_parser().parse_args())
