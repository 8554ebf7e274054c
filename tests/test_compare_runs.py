"""evaluate.py's comparison of run kinds (the MRL paper's Figure 2): MRL, MRL-E, fixed-feature FF-K runs and the
baseline's PCA, in one table and one figure, from real runs trained here on digits."""

import argparse
import json

import matplotlib.pyplot as plt
import pytest
import torch
from accelerate import Accelerator
from conftest import DIGITS_FAST, run_script
from safetensors.torch import load_file, save_file

import evaluate
from mrl import UserError
from mrl.batches.transforms import ImageTransform, build_transform
from mrl.data.sources import load_splits
from mrl.eval import results as eval_report
from mrl.eval.features import extract
from mrl.eval.results import comparison
from mrl.report import plots
from mrl.run_folder.final_model import load_model

pytestmark = pytest.mark.xdist_group("test_compare_runs")

PNG = b"\x89PNG\r\n\x1a\n"
TRAIN = [*DIGITS_FAST, "--epochs", 1, "--max_train_samples", 256, "--batch_size", 64]


def single_head_copy(source, target, dim, **heads):
    """A run whose one head is `source`'s head at `dim`, on the same backbone: the model an FF-K run (or a baseline)
    is, with weights whose accuracy the source run measured."""
    config = json.loads((source / "config.json").read_text())
    position = config["heads"]["dims"].index(dim)
    weights = load_file(source / "model.safetensors")
    kept = {k: v for k, v in weights.items() if k.startswith("backbone.")}
    kept.update({k.replace(f"heads.classifiers.{position}.", "heads.classifiers.0."): v for k, v in weights.items()
                 if k.startswith(f"heads.classifiers.{position}.")})
    target.mkdir()
    save_file(kept, target / "model.safetensors")
    config["heads"].update(dims=[dim], **heads)
    (target / "config.json").write_text(json.dumps(config))


def run_evaluate(*args):
    """evaluate.py in this process (its imports are already paid for), as a user runs it (without the retrieval
    grids: tests/test_retrieval_grid.py and tests/test_evaluate.py check them)."""
    evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in args]
                                                        + ["--report_to", "none", "--no-retrieval_grid"]))


def tied_copy(source, target):
    """An MRL-E run on `source`'s backbone: its one shared weight matrix is `source`'s full-width head."""
    config = json.loads((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    last = len(config["heads"]["dims"]) - 1
    kept = {k: v for k, v in weights.items() if k.startswith("backbone.")}
    kept.update({k.replace(f"heads.classifiers.{last}.", "heads.classifier."): v for k, v in weights.items()
                 if k.startswith(f"heads.classifiers.{last}.")})
    target.mkdir()
    save_file(kept, target / "model.safetensors")
    config["heads"]["tied"] = True
    (target / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """An MRL run trained here; an MRL-E run, FF-8, FF-16 (one with train_supervised.py's fixed_feature key, one with
    a single --dims head, as runs written before it) and a baseline cut from it; all five evaluated together."""
    tmp = tmp_path_factory.mktemp("compare")
    run_script("train_supervised.py", *TRAIN, "--output_dir", tmp / "mrl", tmp_path=tmp)
    tied_copy(tmp / "mrl", tmp / "mrl_e")
    single_head_copy(tmp / "mrl", tmp / "ff8", 8, fixed_feature=8)
    single_head_copy(tmp / "mrl", tmp / "ff16", 16)
    single_head_copy(tmp / "mrl", tmp / "baseline", 512, baseline=True)
    out = tmp / "out"
    run_evaluate("--checkpoint", *(tmp / n for n in ("mrl", "mrl_e", "ff8", "ff16", "baseline")), "--dims", "8,16,512",
                 "--max_train_samples", 256, "--probe_l2", "1e-3", "--shortlist", 50, "--num_workers", 0,
                 "--output_dir", out)
    return tmp, json.loads((out / "results.json").read_text())


def test_the_comparison_holds_each_kinds_own_numbers(compared):
    tmp, results = compared
    runs = {run["label"]: run for run in results["runs"]}
    assert [runs[n]["family"] for n in ("mrl", "mrl_e", "ff8", "ff16", "baseline")] == \
        ["MRL", "MRL-E", "FF", "FF", "baseline"]
    mrl, mrl_e, ff, baseline = results["comparison"]["series"]
    assert [s["name"] for s in (mrl, mrl_e, ff, baseline)] == ["MRL", "MRL-E", "FF", "baseline PCA"]
    # MRL's line is its heads at every trained dim (not only --dims), as training measured them on the same split
    trained = json.loads((tmp / "mrl" / "metrics.json").read_text())
    assert mrl["dims"] == trained["dims"] == runs["mrl"]["heads"]["dims"]
    assert mrl["top1"] == pytest.approx(trained["test"]["accuracy"], abs=0.003)
    assert mrl_e["dims"] == runs["mrl_e"]["heads"]["dims"] and mrl_e["top1"] == runs["mrl_e"]["heads"]["top1"]
    # FF: one point per run at d=K, its single head's accuracy -- the MRL heads it was cut from, on identical features
    assert ff["dims"] == [8, 16] and ff["runs"] == ["ff8", "ff16"]
    assert ff["top1"] == [runs["ff8"]["heads"]["top1"][0], runs["ff16"]["heads"]["top1"][0]]
    assert ff["top1"] == [mrl["top1"][mrl["dims"].index(8)], mrl["top1"][mrl["dims"].index(16)]]
    assert runs["ff8"]["per_dim"][0]["head"] == ff["top1"][0]
    # the baseline's line: the probe on its embedding reduced to d by PCA, at the evaluated dims
    assert baseline["dims"] == [8, 16, 512]
    assert baseline["top1"] == [r["pca_probe"] for r in runs["baseline"]["per_dim"]]
    assert results["comparison"]["dims"] == sorted(set(mrl["dims"]) | {8, 16, 512})
    for s in (mrl, mrl_e, ff, baseline):
        assert all(0 <= t1 <= t5 <= 1 for t1, t5 in zip(s["top1"], s["top5"])), s


def test_top5_equals_a_direct_computation(compared):
    """MRL's top-5 at every head, recomputed here: the test split through the saved model, in float32 (evaluate.py
    caches float16 features, so one image in the 180 may rank its 5th and 6th classes the other way)."""
    tmp, results = compared
    backbone, heads, config = load_model(tmp / "mrl")
    data = config["data"]
    splits = load_splits("digits", seed=data["seed"], val_fraction=data["val_fraction"],
                         test_fraction=data["test_fraction"])
    splits.test.set_transform(ImageTransform(build_transform(data["augment"], data["image_size"], data["mean"],
                                                             data["std"], train=False)))
    features, labels = extract(Accelerator(cpu=True), backbone, splits.test, batch_size=64)
    with torch.no_grad():
        logits = heads(features)
    top5 = [(z.topk(5, -1).indices == labels[:, None]).any(-1).float().mean().item() for z in logits]
    assert results["comparison"]["series"][0]["top5"] == pytest.approx(top5, abs=1.01 / len(labels))


def test_table_and_figure(compared):
    tmp, results = compared
    out = tmp / "out"
    markdown = (out / "results.md").read_text()
    assert "| dim | MRL top-1 | MRL top-5 | MRL-E top-1 | MRL-E top-5 | FF top-1 | FF top-5 | baseline PCA top-1 " \
           "| baseline PCA top-5 |" in markdown
    mrl, mrl_e, ff, baseline = results["comparison"]["series"]
    section = markdown.split("## Comparison")[1].split("\n\n")[1]  # the table, after the section's title
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in section.splitlines())}
    assert rows["16"][1:3] == [f"{mrl['top1'][mrl['dims'].index(16)]:.4f}", f"{mrl['top5'][mrl['dims'].index(16)]:.4f}"]
    assert rows["16"][5] == f"{ff['top1'][1]:.4f}" and rows["16"][7] == f"{baseline['top1'][1]:.4f}"
    assert rows["32"][5:] == ["", "", "", ""]  # neither an FF run nor the baseline's PCA at 32
    data = (out / "comparison.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    fig = plots.comparison_figure(results["comparison"]["series"])
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["MRL", "MRL-E", "FF", "baseline PCA"]
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-.", ":"]
    assert list(lines[2].get_xdata()) == [8, 16]
    assert list(lines[2].get_ydata()) == pytest.approx([100 * v for v in ff["top1"]])
    assert fig.axes[0].get_xscale() == "log"
    plt.close(fig)


def test_when_the_comparison_is_drawn():
    def config(**heads):
        return {"model": {"embed_dim": 2048},
                "heads": {"dims": [8, 2048], "tied": False, "baseline": False, **heads} if heads != {"ssl": 1}
                else None}
    mrl, mrl_e, ssl = config(), config(tied=True), config(ssl=1)
    ff, old_ff = config(dims=[8], fixed_feature=8), config(dims=[64])
    baseline = config(dims=[2048], baseline=True)
    family = eval_report.run_family
    assert [family(c) for c in (mrl, mrl_e, ff, old_ff, baseline, ssl)] == \
        [("MRL", None), ("MRL-E", None), ("FF", 8), ("FF", 64), ("baseline", None), ("SSL", None)]
    wants = eval_report.wants_comparison
    assert not wants([family(mrl)]) and not wants([family(mrl), family(ssl)])
    assert wants([family(ff)]) and wants([family(mrl), family(baseline)]) and wants([family(mrl), family(mrl_e)])


def test_two_ff_runs_at_one_k_are_refused():
    run = {"family": "FF", "fixed_feature": 8, "heads": {"dims": [8], "top1": [0.5], "top5": [0.9]}}
    with pytest.raises(UserError, match="two fixed-feature runs at K=8"):
        comparison(argparse.Namespace(pca=True), [{**run, "label": "a"}, {**run, "label": "b"}])
