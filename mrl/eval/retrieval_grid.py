"""Retrieval you can see: a query beside its nearest database images at a few prefix sizes d, one row per d, with
the similarity (and the class, when known) under each image. mrl.report.plots.retrieval_grid draws it; this module decides
what goes in it: which prefix sizes, which evaluation images serve as queries, where the thumbnails come from.

embed.py --query draws its own queries and ranks exactly as its printed results; evaluate.py calls evaluation_grid
for each run, which ranks like its retrieval metrics (mrl.eval.retrieval.prefix_neighbors: cosine on the L2-renormalized
prefix, train split as the database).

Several queries make one figure, a block of rows per query stacked top to bottom, not one file each: the failures
of a small d show when queries are compared side by side, and a run logs one image to W&B, not a gallery.
"""

import math
from collections import Counter

import datasets
from mrl.batches.decode import open_image
from mrl.eval.retrieval import prefix_neighbors
from mrl.report.plots import Thumb, retrieval_grid

GRID_QUERIES = 8  # evaluation images shown per run
GRID_K = 5  # neighbours per row


def default_grid_dims(dims):
    """Three prefix sizes from `dims` (those the model trained, ending at the full embedding): the smallest, the one
    nearest the geometric middle (on a log scale; the smaller on a tie) and the largest -- 8, 64 and 512 for a
    ResNet-18 trained on 8..512."""
    dims = sorted(set(dims))
    middle = min(dims, key=lambda d: abs(math.log2(d) - (math.log2(dims[0]) + math.log2(dims[-1])) / 2))
    return sorted({dims[0], middle, dims[-1]})


def pick_queries(labels, count=GRID_QUERIES):
    """Positions of `count` evaluation rows to show, the same on every run over the same split: one per class while
    classes last -- classes evenly spaced over the sorted labels when there are more classes than queries, every
    class in turn (again and again, skipping the exhausted) when there are fewer -- and of a class picked n times the
    rows 0, 1/n, 2/n, ... of the way through its rows in split order (its first row when picked once)."""
    labels = [int(y) for y in labels]
    classes = sorted(set(labels))
    count = min(count, len(labels))
    rows = {c: [] for c in classes}
    for i, y in enumerate(labels):
        rows[y].append(i)
    if len(classes) >= count:
        classes = [classes[j * len(classes) // count] for j in range(count)]
    order, times = [], Counter()  # the class of each pick, and how many picks each class gets
    while len(order) < count:
        for c in [c for c in classes if times[c] < len(rows[c])][:count - len(order)]:
            order.append(c)
            times[c] += 1
    seen, picks = Counter(), []
    for c in order:
        picks.append(rows[c][seen[c] * len(rows[c]) // times[c]])
        seen[c] += 1
    return picks


def split_thumbnails(dataset):
    """thumbnail(i): row i of a split (mrl.data's undecoded `image` column) as an RGB PIL image, None when it cannot
    be read, without the split's training or evaluation transform. A streamed split (no random access) has none."""
    if not isinstance(dataset, datasets.Dataset):
        return lambda i: None
    raw = dataset.with_format(None)  # a copy without the transform set on the split
    return lambda i: open_image(raw[int(i)]["image"])


def ranked_blocks(queries, rankings, thumbnail, caption, labels=None, query_labels=None):
    """The grid's blocks (see mrl.report.plots.retrieval_grid_figure). `queries`: a Thumb per query; `rankings`: {row title:
    (scores, ids)}, each (queries, k), most similar first; thumbnail(i) and caption(i): database item i's image and
    name. With `labels` (of the database) and `query_labels`, each neighbour's border says whether it has the
    query's label."""
    images = {}  # an image shown in several rows is decoded once

    def cell(i, score, query):
        if i not in images:
            images[i] = thumbnail(i)
        match = None if labels is None or query_labels is None else int(labels[i]) == int(query_labels[query])
        return Thumb(images[i], f"{score:.3f}\n{caption(i)}", match)

    rankings = {title: (scores.cpu().tolist(), ids.cpu().tolist()) for title, (scores, ids) in rankings.items()}
    return [(query, [(title, [cell(i, s, q) for s, i in zip(scores[q], ids[q])])
                     for title, (scores, ids) in rankings.items()])
            for q, query in enumerate(queries)]


def evaluation_grid(path, train_x, train_y, eval_x, eval_y, dims, database_thumbnail, query_thumbnail,
                    class_names=None, k=GRID_K, count=GRID_QUERIES, device=None, title=None):
    """Write one run's retrieval grid to `path` (PNG) and return the path: `count` evaluation images (pick_queries)
    and, for each d in `dims`, their k nearest train images by cosine on the L2-renormalized prefix, as
    evaluate.py's retrieval metrics rank them; green border: the neighbour has the query's class, red: another.
    train_x/eval_x: the splits' features (the full embedding, any float dtype); train_y/eval_y: their labels;
    database_thumbnail(i)/query_thumbnail(i): the image of train/evaluation row i (split_thumbnails)."""
    picks = pick_queries(eval_y.tolist(), count)
    neighbors = prefix_neighbors(eval_x[picks], train_x, sorted(dims), k, device)

    def name(y):
        return class_names[int(y)] if class_names is not None else str(int(y))

    queries = [Thumb(query_thumbnail(i), f"query\n{name(eval_y[i])}") for i in picks]
    blocks = ranked_blocks(queries, {f"d = {d}": neighbors[d] for d in sorted(dims)}, database_thumbnail,
                           lambda i: name(train_y[i]), train_y.tolist(), [eval_y[i] for i in picks])
    return retrieval_grid(blocks, path, title or f"nearest train images of {len(picks)} evaluation images, "
                                                  "by cosine on each prefix")
