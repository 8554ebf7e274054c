"""embed.py on the session's trained digits run: a folder of images embedded by two processes and searched through
a small-prefix faiss index with full-dim re-ranking, a dataset split with its row ids, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from PIL import Image

import datasets
import embed
from mrl.data.sources import digits_dataset, load_splits
from mrl.pretrained import MatryoshkaEncoder
from mrl.utils import script

# its module fixtures are built once: all of its tests run on one pytest-xdist worker (pytest.ini)
pytestmark = pytest.mark.xdist_group("test_embed")


@pytest.fixture(scope="module")
def run(trained):
    tmp, _ = trained
    return tmp / "out"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 distinct real digit images as PNG files (a third in a subfolder, one saved as RGBA), and a corrupt file."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    seen, paths, digits = set(), [], digits_dataset()
    for item in digits:
        if item["image"].tobytes() in seen:
            continue
        seen.add(item["image"].tobytes())
        n = len(paths)
        path = root / ("sub" if n % 3 == 0 else "") / f"{n:02d}_digit{item['label']}.png"
        (item["image"].convert("RGBA") if n == 5 else item["image"]).save(path)
        paths.append(str(path))
        if len(paths) == 12:
            break
    (root / "broken.png").write_bytes(b"\x89PNG not an image")
    return root, sorted(paths)


def embed_cli(*argv):
    """embed.py in this process, as its __main__ runs it (UserError -> SystemExit with the one-line message)."""
    script.run(embed.main, embed.get_args_parser().parse_args([str(a) for a in argv]))


def search_results(stdout):
    """{query: [(score, name), ...]} from the printed results."""
    results, query = {}, None
    for line in stdout.splitlines():
        if line.startswith("query "):
            query = line[len("query "):]
            results[query] = []
        elif query is not None and line.startswith("  "):
            _, score, name = line.split(maxsplit=2)
            results[query].append((float(score), name))
    return results


def test_folder_embedded_by_two_processes_and_each_query_finds_itself(run, folder, tmp_path, capsys):
    root, paths = folder
    out = tmp_path / "emb"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "embed.py"),
         "--checkpoint", str(run), "--images", str(root), "--dims", "8,64,512", "--index_dim", "8",
         "--batch_size", "4", "--num_workers", "0", "--output_dir", str(out)],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and "embedded 12 images" in result.stdout
    assert f"1 unreadable, skipped: {root / 'broken.png'}" in result.stdout

    # a `datasets` dataset in Parquet: each image once, in path order, with every prefix L2-normalized
    table = datasets.load_dataset("parquet", data_files=str(out / "embeddings.parquet"), split="train")
    assert table.column_names == ["path", "embedding_8", "embedding_64", "embedding_512"]
    assert table["path"] == paths
    z = {d: torch.tensor(table[f"embedding_{d}"]) for d in (8, 64, 512)}
    assert all(torch.allclose(v.norm(dim=1), torch.ones(12), atol=1e-5) for v in z.values())
    torch.testing.assert_close(F.normalize(z[512][:, :8], dim=1), z[8], rtol=0, atol=1e-5)
    # the same numbers as the model's own encode in this one process
    expected = MatryoshkaEncoder.from_pretrained(run, device="cpu").encode(paths, dim=[8, 64, 512])
    for d in z:
        torch.testing.assert_close(z[d], expected[d], rtol=0, atol=1e-5)
    manifest = json.loads((out / "embed.json").read_text())
    assert manifest["count"] == 12 and manifest["skipped_unreadable"] == 1
    assert {k: v for k, v in manifest["index"].items() if k != "index_bytes"} == {
        "file": "index_d8_flat_float32.faiss", "dim": 8, "type": "flat", "precision": "float32", "bytes_per_image": 32,
        "rerank_dim": 512}

    # search: shortlist by the 8-dim index, re-rank at 512; every image is its own nearest neighbour
    embed_cli("--index", out, "--query", *paths, "--top_k", 3, "--shortlist", 6)
    stdout = capsys.readouterr().out
    assert "nearest of 12 images (shortlist of 6 by dim 8 (flat float32 faiss index), re-ranked at dim 512)" in stdout
    results = search_results(stdout)
    assert list(results) == paths
    for query, hits in results.items():
        assert len(hits) == 3 and hits[0][1] == query and hits[0][0] > 0.9999
        assert hits[0][0] >= hits[1][0] >= hits[2][0]
    # without an index: exact search at the full dim finds the same first hits
    embed_cli("--checkpoint", run, "--images", root, "--dims", "512", "--output_dir", tmp_path / "exact",
              "--num_workers", 0)
    embed_cli("--index", tmp_path / "exact", "--query", root / "sub", "--top_k", 1)
    exact = search_results(capsys.readouterr().out)
    assert {q: hits[0][1] for q, hits in exact.items()} == {p: p for p in paths if "/sub/" in p}


def test_dataset_split_keeps_split_row_and_label(run, tmp_path, capsys):
    out = tmp_path / "emb"
    embed_cli("--checkpoint", run, "--dataset", "digits", "--split", "test", "--dims", "16,512", "--index_dim", 16,
              "--index_type", "hnsw", "--output_dir", out, "--num_workers", 0)
    test = load_splits("digits").test  # the run's split: seed 0 and its fractions, as config.json says
    table = pq.read_table(out / "embeddings.parquet")
    assert table.column("split").to_pylist() == ["test"] * len(test)
    assert table.column("row").to_pylist() == test["index"] and table.column("label").to_pylist() == test["label"]
    features = datasets.load_dataset("parquet", data_files=str(out / "embeddings.parquet"), split="train").features
    assert features["label"].names == [str(i) for i in range(10)]
    # a test image whose pixels no other test image has, as a file: found first, named by its split and row
    images = [np.asarray(im) for im in test.cast_column("image", datasets.Image())["image"]]
    unique = next(i for i, a in enumerate(images) if sum(np.array_equal(a, b) for b in images) == 1)
    Image.fromarray(images[unique]).save(tmp_path / "query.png")
    embed_cli("--index", out, "--query", tmp_path / "query.png", "--top_k", 2)
    (hits,) = search_results(capsys.readouterr().out).values()
    score, name = hits[0]
    assert name == f"test[{test[unique]['index']}] label {test[unique]['label']}" and score > 0.9999


@pytest.mark.parametrize("argv, message", [
    ([], "give one of --images FOLDER or --dataset NAME to embed"),
    (["--images", "nowhere"], "--images nowhere is not a folder"),
    (["--query", "a.png"], "--query needs --index"),
    (["--dataset", "digits", "--index_dim", 1024], "--dims and --index_dim must lie in 1..512"),
    (["--dataset", "digits", "--dims", "8,64", "--index_dim", 128], "--index_dim 128 is above the largest of --dims"),
])
def test_bad_input_is_one_line(run, argv, message):
    with pytest.raises(SystemExit) as exit_:
        embed_cli("--checkpoint", run, *argv)
    assert message in exit_.value.code and "\n" not in exit_.value.code


def test_refuses_to_overwrite_embeddings(run, tmp_path):
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "embed.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds embeddings; pass --overwrite"):
        embed_cli("--checkpoint", run, "--dataset", "digits", "--output_dir", tmp_path / "emb")


def test_a_large_collection_is_written_a_chunk_at_a_time_with_the_same_content(run, folder, tmp_path, monkeypatch):
    # embeddings leave the accelerator batch by batch and reach the disk chunk by chunk (a Parquet row group each,
    # added to the index as written): 12 images in batches of 4, written once 5 rows wait, are 2 row groups (8 + 4),
    # holding what one chunk of them all holds
    from accelerate.state import AcceleratorState, GradientState

    root, paths = folder
    outputs = {}
    for rows in (5, 1000):
        monkeypatch.setattr(embed.EmbeddingWriter, "CHUNK_ROWS", rows)
        out = tmp_path / f"chunks_{rows}"
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        embed_cli("--checkpoint", run, "--images", root, "--dims", "8,512", "--index_dim", "8", "--batch_size", 4,
                  "--num_workers", 0, "--output_dir", out)
        outputs[rows] = out
    assert pq.ParquetFile(outputs[5] / "embeddings.parquet").metadata.num_row_groups == 2
    assert pq.ParquetFile(outputs[1000] / "embeddings.parquet").metadata.num_row_groups == 1
    chunked, whole = (pq.read_table(out / "embeddings.parquet") for out in (outputs[5], outputs[1000]))
    assert chunked.equals(whole) and chunked.column("path").to_pylist() == paths
    import faiss

    indices = [faiss.read_index(str(out / "index_d8_flat_float32.faiss")) for out in (outputs[5], outputs[1000])]
    assert indices[0].ntotal == indices[1].ntotal == 12
    np.testing.assert_array_equal(indices[0].reconstruct_n(0, 12), indices[1].reconstruct_n(0, 12))


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_a_quantized_index_finds_each_image_and_another_model_is_refused(run, folder, tmp_path, capsys, precision):
    """An int8 or a binary shortlist over 16 dims, re-ranked in float32 at 512: every image is still its own nearest
    (the shortlist of 6 of 12 holds it), and the search says what it used. Searching it with another model's queries
    is one line."""
    root, paths = folder
    out = tmp_path / "emb"
    embed_cli("--checkpoint", run, "--images", root, "--dims", "16,512", "--index_dim", 16, "--index_precision",
              precision, "--num_workers", 0, "--output_dir", out)
    manifest = json.loads((out / "embed.json").read_text())
    assert manifest["index"]["precision"] == precision
    assert manifest["index"]["bytes_per_image"] == {"int8": 16, "binary": 2}[precision]
    capsys.readouterr()
    embed_cli("--index", out, "--query", *paths, "--top_k", 2, "--shortlist", 6, "--grid", "none")
    stdout = capsys.readouterr().out
    assert f"shortlist of 6 by dim 16 (flat {precision} faiss index), re-ranked at dim 512" in stdout
    assert all(hits[0][1] == query and hits[0][0] > 0.9999 for query, hits in search_results(stdout).items())

    other = tmp_path / "other"  # the same architecture, other weights: another embedding space
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((run / name).read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, other / "model.safetensors")
    with pytest.raises(SystemExit, match=f"--index {out} holds embeddings of .*; --checkpoint {other} is another "
                                         "model"):
        embed_cli("--index", out, "--query", paths[0], "--checkpoint", other)

