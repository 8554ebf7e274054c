"""The saved W&B workspace view (mrl/report/workspace.py) against what real offline runs logged: a supervised run with top-5
(the tiny ImageNet: 1,000 classes, an unreadable image), an SSL run and an evaluation of it, all at dims that are not
the defaults. Everything up to the network: the view is built, serialized to the spec W&B stores
and read back; only the save is replaced."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_script
from wandb_history import config, history, records, run_dirs

import mrl.report.workspace as workspace
from mrl import UserError

# its module fixture is built once: all of its tests run on one pytest-xdist worker (pytest.ini)
pytestmark = pytest.mark.xdist_group("test_workspace")

DIMS = [8, 16, 32]
FAST_STATS = {"WANDB__STATS_SAMPLING_INTERVAL": "1"}  # W&B's system metrics each second, not each 15 s


@pytest.fixture(scope="module")
def logged(tmp_path_factory, tiny_imagenet):
    """What three real runs logged: {"series": scalar history keys, "media": {key: W&B type}, "charts": {key: its
    panel config on the run page}, "system": system metric keys, "config": the supervised run's config}. The
    supervised run trains at --image_size (the ImageNet preset's progressive resizing would train at 160-192 px)."""
    tmp = tmp_path_factory.mktemp("workspace")
    dims = ["--dims", ",".join(map(str, DIMS))]
    run_script("train_supervised.py", "--dataset", "imagenet", "--dataset_path", tiny_imagenet.folder, "--model",
               "resnet18", "--norm", "group", "--image_size", 16, "--min_res", 16, "--max_res", 16, "--epochs", 1,
               "--batch_size", 5, "--num_workers", 0, "--log_every", 1, *dims, "--output_dir", tmp / "supervised",
               tmp_path=tmp, wandb=True, env=FAST_STATS)
    run_script("train_ssl.py", "--dataset", "digits", "--image_size", 8, "--num_workers", 0, "--method", "relic",
               "--epochs", 1, "--batch_size", 16, "--max_train_samples", 32, "--knn_every", 1, "--log_every", 1, *dims,
               "--output_dir", tmp / "ssl", tmp_path=tmp, wandb=True)
    run_script("evaluate.py", "--checkpoint", tmp / "ssl", "--dims", "8,16", "--max_train_samples", 100,
               "--max_eval_samples", 50, "--num_workers", 0, "--feature_cache", "none", "--output_dir", tmp / "eval",
               tmp_path=tmp, wandb=True)
    found = read_logged(tmp / "wandb")
    assert found["config"]["dims"] == DIMS and found["config"]["num_classes"] == 1000  # the supervised run
    return found


def read_logged(wandb_dir):
    found = {"series": set(), "media": {}, "charts": {}, "system": set()}
    for run_dir in run_dirs(wandb_dir):
        keys = {key: value for row in history(run_dir) for key, value in row.items() if not key.startswith("_")}
        media = {key[:-len("/_type")]: value for key, value in keys.items() if key.endswith("/_type")}
        found["media"].update(media)
        found["series"] |= {key for key in keys if not any(key.startswith(f"{m}/") for m in media)}
        found["charts"].update(config(run_dir)["_wandb"].get("visualize", {}))
        (path,) = [p for p in os.listdir(run_dir) if p.endswith(".wandb")]
        found["system"] |= {"system/" + item.key for r in records(os.path.join(run_dir, path))
                            if r.WhichOneof("record_type") == "stats" for item in r.stats.item}
    found["config"] = config(run_dirs(wandb_dir)[0])  # the first run: the supervised one
    return found


def saved_sections(view):
    """The view's sections as W&B stores them (the spec JSON) and as the library reads them back: {name: panels}."""
    from wandb_workspaces.workspaces import Section, internal

    spec = internal.WorkspaceViewspec.model_validate_json(
        view._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))
    return {section.name: Section._from_model(section).panels for section in spec.section.panel_bank_config.sections}


def test_every_panel_shows_a_logged_series_and_every_series_has_a_panel(logged):
    view = workspace.build_workspace("an-entity", "a-project")
    sections = saved_sections(view)
    assert list(sections) == ["Accuracy per dim", "Loss per dim", "Accuracy against dim", "Evaluations (evaluate.py)",
                              "MRL vs baseline", "Throughput"]
    regexes, charts, keys = [], set(), logged["series"] | logged["system"]
    for name, panels in sections.items():
        for panel in panels:
            kind = type(panel).__name__
            if kind == "LinePlot":
                shown = [key for key in keys if re.search(panel.metric_regex, key)]
                assert shown, f"{name}: {panel.title} ({panel.metric_regex}) matches no logged key"
                regexes.append(panel.metric_regex)
            elif kind == "CustomChart":  # the same chart as on the run page: its table, Vega spec and fields
                key = panel.query["summaryTable"]["tableKey"].removesuffix("_table")
                on_page = logged["charts"][key]["panel_config"]
                assert logged["media"][f"{key}_table"] == "table-file"
                assert (panel.chart_name, panel.chart_fields) == (on_page["panelDefId"], on_page["fieldSettings"])
                charts.add(key)
            elif kind == "MediaBrowser":
                assert all(logged["media"][key] == "image-file" for key in panel.media_keys), panel.media_keys
            elif kind == "WeavePanelSummaryTable":
                assert logged["media"][panel.table_name] == "table-file", panel.table_name
            else:
                assert kind == "RunComparer", kind

    assert charts == set(logged["charts"])  # every native chart the scripts log

    # each per-dim family is one panel, whatever the dims: a line per dim
    per_dim = {key for key in logged["series"] if re.search(r"_d\d+$", key)}
    assert {re.sub(r"\d+$", "", key) for key in per_dim} == {
        "train/loss_d", "val/accuracy_d", "val/top5_d", "val/loss_d", "knn/accuracy_d"}
    for key in per_dim:
        (regex,) = [r for r in regexes if re.search(r, key)]
        assert {k for k in per_dim if re.search(regex, k)} == {re.sub(r"\d+$", str(d), key) for d in DIMS}
    # every other series the scripts log has its panel too (epoch: an x-axis), and no regex runs into another's
    for key in logged["series"] - {"epoch"}:
        assert len([r for r in regexes if re.search(r, key)]) == 1, key
    assert re.search(regexes[0], "val/accuracy_d2048") and not re.search(regexes[0], "val/accuracy_d8_ema")


def test_runs_are_grouped_by_the_flags_that_tell_the_variants_apart(logged):
    view = workspace.build_workspace("an-entity", "a-project")
    grouping = view._to_model().spec.section.run_sets[0].grouping
    assert [(key.section, key.name) for key in grouping] == [
        ("config", f"{name}.value") for name in ("baseline", "tied", "fixed_feature")]
    assert all(name in logged["config"] for name in workspace.GROUP_BY)
    assert view._to_model().spec.section.settings.should_auto_generate_panels is False  # no panel per key
    ungrouped = workspace.build_workspace("an-entity", "a-project", group_by=())
    assert ungrouped._to_model().spec.section.run_sets[0].grouping == []


def test_the_command_saves_the_view_and_prints_its_address(monkeypatch, capsys):
    import wandb
    from wandb_workspaces.workspaces import Workspace

    saved = []

    def save(view):  # the network call: record what would be sent
        saved.append(view)
        view._internal_name = "a1b2c3"
        return view

    monkeypatch.setattr(wandb, "Api", lambda **kwargs: None)  # as if logged in
    monkeypatch.setattr(Workspace, "save", save)
    monkeypatch.setattr(Workspace, "url", property(lambda view: f"https://wandb.test/{view.entity}/{view.project}"))
    workspace.main(workspace.get_args_parser().parse_args(
        ["--entity", "team", "--project", "mrl-cifar", "--name", "cifar10 sweep", "--group_by", "method"]))
    (view,) = saved
    assert (view.entity, view.project, view.name) == ("team", "mrl-cifar", "cifar10 sweep")
    assert [s.name for s in view.sections] == [name for name, _ in workspace.SECTIONS]
    assert [k.name for k in view._to_model().spec.section.run_sets[0].grouping] == ["method.value"]
    assert capsys.readouterr().out == (
        "saved the workspace view 'cifar10 sweep' of team/mrl-cifar: https://wandb.test/team/mrl-cifar\n")

    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    with pytest.raises(UserError, match="--entity"):
        workspace.main(workspace.get_args_parser().parse_args([]))


def test_without_a_login_the_command_says_so_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"), WANDB_CONFIG_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "mrl.report.workspace", "--entity", "team"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: W&B: ") and "API key" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
