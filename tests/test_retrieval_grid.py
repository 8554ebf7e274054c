"""Retrieval grids read back from their PNG: which image sits in which cell (one row per prefix d, the query first,
then its neighbours in the order cosine on the renormalized prefix gives), the borders that say same class or not,
the captions; and embed.py --query drawing its results for a real run."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_embed import embed_cli, folder, run, search_results  # noqa: F401, F811 (fixtures: the session's trained run, 12 digit images)

import embed
from mrl.eval.retrieval_grid import default_grid_dims, evaluation_grid, pick_queries, ranked_blocks, split_thumbnails
from mrl.hub.embedding_store import columns_matrix
from mrl.report import plots
from mrl.report.plots import Thumb

pytestmark = pytest.mark.xdist_group("test_embed")  # the same run and folder fixtures as test_embed.py


def solid(color):
    return Image.new("RGB", (12, 12), color)


def hex_rgb(color):
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def cell_boxes(png, blocks, rows, columns):
    """{(query, row, column): (left, top, right, bottom)} in the PNG's pixels, from the grid layout of that shape
    (the real figure code, with empty cells); checks that the PNG has that layout's size."""
    empty = Thumb(None, "")
    fig = plots.retrieval_grid_figure([(empty, [("", [empty] * (columns - 1))] * rows)] * blocks)
    width, height = (fig.get_size_inches() * plots.GRID_DPI).round().astype(int)
    assert png.shape[:2] == (height, width)
    boxes = {}
    for ax in fig.axes:
        q, r, c = (int(part.split()[1]) for part in ax.get_label().split(", "))
        box = ax.get_position()
        boxes[q, r, c] = (box.x0 * width, (1 - box.y1) * height, box.x1 * width, (1 - box.y0) * height)
    plots.plt.close(fig)
    assert len(boxes) == blocks * rows * columns
    return boxes


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def cosine_ranking(queries, database, d, k):
    """The expected neighbours, computed here: cosine on each L2-renormalized prefix, sorted."""
    similarity = F.normalize(queries[:, :d].double(), dim=1) @ F.normalize(database[:, :d].double(), dim=1).T
    scores, ids = similarity.sort(dim=1, descending=True)
    return scores[:, :k], ids[:, :k]


def features(seed=0):
    """Database (train) and query (evaluation) features whose neighbour order differs between the 2-dim prefix and
    the full 16 dims, with 3 classes."""
    g = torch.Generator().manual_seed(seed)
    train_x, eval_x = torch.randn(24, 16, generator=g), torch.randn(9, 16, generator=g)
    return train_x, torch.arange(24) % 3, eval_x, torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0])


def test_pick_queries_one_per_class_then_round_again():
    labels = [2, 0, 1, 0, 2, 1, 0, 0, 1]  # class 0 at rows 1, 3, 6, 7; class 1 at 2, 5, 8; class 2 at 0, 4
    assert pick_queries(labels, 3) == [1, 2, 0]  # each class's first row
    assert pick_queries(labels, 2) == [1, 2]  # classes 0 and 1 (evenly spaced over 3)
    # 5 queries: every class, then classes 0 and 1 again, each from half-way through its rows
    assert pick_queries(labels, 5) == [1, 2, 0, 6, 5]
    assert pick_queries([0, 0, 0, 1], 4) == [0, 3, 1, 2]  # class 1 has one row: class 0 gives the rest
    assert pick_queries(labels, 50) == pick_queries(labels, 9) and sorted(pick_queries(labels, 9)) == list(range(9))


def test_default_grid_dims():
    assert default_grid_dims([8, 16, 32, 64, 128, 256, 512]) == [8, 64, 512]
    assert default_grid_dims([2048, 8, 16, 32, 64, 128, 256, 512, 1024]) == [8, 128, 2048]
    assert default_grid_dims([8, 16, 32, 64, 128, 256, 512, 1024]) == [8, 64, 1024]  # a tie: the smaller
    assert default_grid_dims([16, 1024]) == [16, 1024] and default_grid_dims([512]) == [512]


def test_evaluation_grid_puts_each_neighbour_in_its_cell(tmp_path):
    train_x, train_y, eval_x, eval_y = features()
    dims, k, count = [2, 16], 4, 3
    picks = pick_queries(eval_y.tolist(), count)
    expected = {d: cosine_ranking(eval_x[picks], train_x, d, k)[1] for d in dims}
    assert not torch.equal(expected[2], expected[16])  # the rows must differ for the test to tell them apart
    database_colors = [(10 * i, 255 - 10 * i, (70 * i) % 256) for i in range(len(train_x))]  # unique per image
    query_colors = [(255, 20 * j, 128) for j in range(len(eval_x))]

    path = evaluation_grid(tmp_path / "grid.png", train_x.half(), train_y, eval_x.half(), eval_y, dims,
                           lambda i: solid(database_colors[i]), lambda j: solid(query_colors[j]),
                           class_names=["cat", "dog", "bird"], k=k, count=count)
    png = read_png(path)
    boxes = cell_boxes(png, count, len(dims), k + 1)  # a block of len(dims) rows x (k + 1) columns per query
    for (q, r, c), (left, top, right, bottom) in boxes.items():
        middle = (top + bottom) / 2
        center = png[int(middle), int((left + right) / 2)]
        inside_border = png[int(middle), int(left) + 1]  # the 3-point border lies on the axes' edge
        if c == 0:  # the query, blue
            assert tuple(center) == query_colors[picks[q]]
            assert tuple(inside_border) == hex_rgb(plots.QUERY_BORDER)
        else:  # the (c)th neighbour at dim dims[r]: green when of the query's class
            i = int(expected[dims[r]][q, c - 1])
            assert tuple(center) == database_colors[i], (q, r, c)
            same = bool(train_y[i] == eval_y[picks[q]])
            assert tuple(inside_border) == hex_rgb(plots.BORDERS[same]), (q, r, c)


def test_grid_captions_rows_and_unreadable_images():
    train_x, train_y, eval_x, eval_y = features(1)
    scores, ids = {}, {}
    for d in (2, 16):
        scores[d], ids[d] = cosine_ranking(eval_x[:2], train_x, d, 3)
    names = ["cat", "dog", "bird"]
    blocks = ranked_blocks([Thumb(solid((0, 0, 0)), "query a"), Thumb(None, "query b")],
                           {f"d = {d}": (scores[d].float(), ids[d]) for d in (2, 16)},
                           lambda i: None if i % 2 else solid((i, i, i)), lambda i: names[train_y[i]],
                           train_y.tolist(), eval_y[:2].tolist())
    fig = plots.retrieval_grid_figure(blocks, title="t")
    axes = {tuple(int(part.split()[1]) for part in ax.get_label().split(", ")): ax for ax in fig.axes}
    assert len(axes) == 2 * 2 * 4
    for (q, r, c), ax in axes.items():
        d = (2, 16)[r]
        if c == 0:
            assert ax.get_ylabel() == f"d = {d}" and ax.get_xlabel() == ("query a", "query b")[q]
            continue
        i = int(ids[d][q, c - 1])
        assert ax.get_xlabel() == f"{scores[d][q, c - 1]:.3f}\n{names[train_y[i]]}"
        texts = [t.get_text() for t in ax.texts]
        assert (texts == ["no image"]) == bool(i % 2) and len(ax.images) == 1 - i % 2
        same = bool(train_y[i] == eval_y[q])
        assert ax.spines["left"].get_edgecolor() == plots.matplotlib.colors.to_rgba(plots.BORDERS[same])
    plots.plt.close(fig)


def test_embed_search_draws_its_results(run, folder, tmp_path, capsys):
    """The real CLI: 4 of 12 digit images searched through an 8-dim index; the grid's full-dim row holds the printed
    results, the rows at 8 and 64 the ranking on those prefixes, and every cell shows its image's pixels."""
    root, paths = folder
    queries = paths[::3]
    out = tmp_path / "emb"
    embed_cli("--checkpoint", run, "--images", root, "--dims", "8,64,512", "--index_dim", 8, "--output_dir", out,
              "--num_workers", 0)
    embed_cli("--index", out, "--query", *queries, "--top_k", 3, "--shortlist", 12)
    stdout = capsys.readouterr().out
    assert f"wrote the results as a picture: {out / 'search_grid.png'} (rows d = 8, 64, 512)" in stdout
    printed = search_results(stdout)

    database = columns_matrix(pq.read_table(out / "embeddings.parquet"), 512)
    query_rows = [paths.index(q) for q in queries]  # the queries are database images too
    expected = {d: cosine_ranking(database[query_rows], database, d, 3)[1] for d in (8, 64)}
    expected[512] = torch.tensor([[paths.index(name) for _, name in printed[q]] for q in queries])
    assert not torch.equal(expected[8], expected[512])
    pixels = [np.asarray(Image.open(p).convert("RGB")).astype(int) for p in paths]  # 8x8 each
    png = read_png(out / "search_grid.png")
    for (q, r, c), (left, top, right, bottom) in cell_boxes(png, len(queries), 3, 4).items():
        # the image drawn in the cell: the centre of each of its 8x8 pixels
        ys, xs = (top + (np.arange(8) + 0.5) * (bottom - top) / 8), (left + (np.arange(8) + 0.5) * (right - left) / 8)
        shown = png[ys.astype(int)[:, None], xs.astype(int)[None, :]]
        i = query_rows[q] if c == 0 else int(expected[(8, 64, 512)[r]][q, c - 1])
        assert np.abs(shown - pixels[i]).max() <= 2, (q, r, c)

    # other rows by flag; a bad one is one line; no picture with --grid none
    embed_cli("--index", out, "--query", paths[0], "--grid_dims", "4,512", "--grid", tmp_path / "two.png")
    assert "(rows d = 4, 512)" in capsys.readouterr().out
    cell_boxes(read_png(tmp_path / "two.png"), 1, 2, 6)  # 1 query, 2 rows, the query and 5 neighbours (--top_k 5)
    with pytest.raises(SystemExit, match=r"--grid_dims must lie in 1\.\.512"):
        embed_cli("--index", out, "--query", paths[0], "--grid_dims", "8,1024")
    embed_cli("--index", out, "--query", paths[0], "--grid", "none", "--top_k", 1)
    assert "picture" not in capsys.readouterr().out


def test_thumbnails_come_from_the_split_without_its_transform():
    # an index embedded from a dataset names its rows by split and source row; the grid reads them back from the
    # splits embed.json records, here in another order than the splits'
    import pyarrow as pa

    import datasets
    from mrl.batches.transforms import ImageTransform
    from mrl.data.sources import load_splits

    splits = load_splits("digits")
    test, val = splits.test, splits.val
    table = pa.table({"split": ["val", "test", "val"], "row": [val["index"][7], test["index"][3], val["index"][0]]})
    test.set_transform(ImageTransform(lambda image: "transformed"))  # what evaluate.py's splits carry
    origin = {"name": "digits", "path": None, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1}
    thumbnail = embed.database_thumbnails({"dataset": origin}, table)
    decoded = {name: ds.with_format(None).cast_column("image", datasets.Image()) for name, ds in
               (("test", test), ("val", val))}
    for i, (name, position) in enumerate([("val", 7), ("test", 3), ("val", 0)]):
        expected = np.asarray(decoded[name][position]["image"].convert("RGB"))
        np.testing.assert_array_equal(np.asarray(thumbnail(i)), expected)
        np.testing.assert_array_equal(np.asarray(split_thumbnails(test if name == "test" else val)(position)),
                                      expected)
    assert embed.database_thumbnails({}, table)(0) is None  # an index from before embed.json named its dataset
