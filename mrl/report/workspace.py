"""A saved W&B workspace view for a project of MRL runs: one panel per kind of series, a line per dim in it.

    python -m mrl.report.workspace --entity my-team --project matryoshka

W&B's default workspace makes one panel per logged key: about 30 line panels for one supervised run (7
`train/loss_d*`, 7 `val/accuracy_d*`, 7 `val/loss_d*`, ...). This view draws each per-dim family in one panel with
a line per dim, selected by a regular expression (`metric_regex`), so it fits any --dims. Its sections:

  Accuracy per dim       validation top-1 and top-5 of the heads (train_supervised.py), online kNN (train_ssl.py)
  Loss per dim           train and validation loss per dim, the objective, its mean over dims, lr, gradient norm
  Accuracy against dim   the native charts (a line per series against log2(dim)), the PNG plots, the per-dim table
  Evaluations            evaluate.py's charts and tables: probe, kNN, retrieval, adaptive classification
  MRL vs baseline        what compares across variants; the runs are grouped by the flags that tell them apart
  Throughput             images/s, step time, data wait, resolution, unreadable images; CPU/GPU use and memory

The view is data (SECTIONS, GROUP_BY) turned into W&B's `wandb-workspaces` objects by `build_workspace`; only
`save_workspace` touches the network. Each run of the command saves a new view (W&B names it; the URL is printed).
"""

import os
from dataclasses import dataclass

from mrl import UserError
from mrl.utils import script

DEFAULT_NAME = "MRL: accuracy per dim"
DEFAULT_PROJECT = "matryoshka"  # the training scripts' --wandb_project default
# The config keys (the scripts' flags) that tell MRL, MRL-E (--tied), FF-K (--fixed_feature) and the baseline apart;
# the workspace's runs are grouped by them, so that seeds of one variant average into one line
GROUP_BY = ("baseline", "tied", "fixed_feature")
LINESERIES = "wandb/lineseries/v0"  # the Vega spec wandb.plot.line_series logs (mrl/report/tracking.py's charts)
WORKSPACES_REQUIREMENT = "wandb-workspaces==0.4.13"


@dataclass(frozen=True)
class Lines:
    """A line plot of every series whose key matches `regex` (W&B matches it against each logged key)."""
    title: str
    regex: str
    x: str = "Step"  # the optimizer step every script logs at; system metrics have no step ("RelativeTime(Process)")


@dataclass(frozen=True)
class Chart:
    """A native chart that mrl/report/tracking.py logged under `key` with wandb.plot.line_series: its table is `key`_table."""
    title: str
    key: str


@dataclass(frozen=True)
class Media:
    """Images logged with wandb.Image (the PNG plots), under these keys."""
    title: str
    keys: tuple


@dataclass(frozen=True)
class Table:
    """A wandb.Table logged under `key`."""
    key: str


@dataclass(frozen=True)
class RunDiff:
    """The runs' config and summary side by side, only what differs."""


PER_DIM = r"_d\d+"  # the dim suffix of every per-dim series

SECTIONS = (
    ("Accuracy per dim", (
        Lines("validation top-1 accuracy of each dim's head", rf"val/accuracy{PER_DIM}"),
        Lines("validation top-5 accuracy of each dim's head (datasets of more than 10 classes)", rf"val/top5{PER_DIM}"),
        Lines("online kNN accuracy of each prefix (train_ssl.py)", rf"knn/accuracy{PER_DIM}"),
    )),
    ("Loss per dim", (
        Lines("train loss of each dim", rf"train/loss{PER_DIM}"),
        Lines("validation loss of each dim", rf"val/loss{PER_DIM}"),
        Lines("the objective: the weighted sum of the per-dim losses", r"(train|val)/loss"),
        Lines("learning rate", r"train/lr"),
        Lines("gradient norm before clipping", r"train/grad_norm"),
        Lines("the SSL method's own state: ReLIC's logit scale, the target network's EMA rate",
              r"train/(logit_scale|ema_gamma)"),
        Lines("optimizer steps skipped by fp16 loss scaling", r"train/skipped_steps"),
    )),
    ("Accuracy against dim", (
        Chart("heads' accuracy against log2(dim): validation and test", "charts/accuracy_vs_dim"),
        Chart("online kNN accuracy against log2(dim): a line per evaluated epoch", "charts/knn_accuracy_vs_dim"),
        Media("accuracy against dim (the saved plots)", ("plots/accuracy_vs_dim", "plots/knn_accuracy_vs_dim")),
        Media("validation embeddings, PCA at a few dims", ("embeddings/pca",)),
        Table("accuracy_per_dim"),
        Table("knn_accuracy_per_dim"),
    )),
    ("Evaluations (evaluate.py)", (
        Chart("linear probe top-1 against log2(dim), with the PCA baseline and the heads", "charts/probe_vs_dim"),
        Chart("kNN top-1 against log2(dim)", "charts/knn_vs_dim"),
        Chart("retrieval mAP@10 against log2(dim)", "charts/map_at_10_vs_dim"),
        Chart("retrieval precision@10 against log2(dim)", "charts/precision_at_10_vs_dim"),
        Chart("adaptive classification: top-1 against log2(expected dims)", "charts/adaptive_classification"),
        Table("per_dim"),
        Table("adaptive_retrieval"),
    )),
    ("MRL vs baseline", (
        # a run with 7 heads and the baseline's one head compare by the mean over dims, not by the sum
        Lines("train loss, mean over dims", r"train/loss_mean_over_dims"),
        Lines("validation loss, mean over dims", r"val/loss_mean_over_dims"),
        RunDiff(),
    )),
    ("Throughput", (
        Lines("images per second: between train-loss logs (perf/) and per epoch (train/)",
              r"(perf|train)/images_per_second"),
        Lines("seconds per optimizer step", r"perf/seconds_per_step"),
        Lines("fraction of the time spent waiting for data", r"perf/data_wait_fraction"),
        Lines("seconds per epoch", r"train/epoch_seconds"),
        Lines("training resolution (progressive resizing)", r"train/resolution"),
        Lines("unreadable images replaced per epoch", r"data/skipped_images"),
        # W&B samples these every 15 s, by wall-clock time
        Lines("CPU and GPU utilization (%)", r"system/(cpu|gpu\.\d+\.gpu)", x="RelativeTime(Process)"),
        Lines("memory used (%): host and GPU", r"system/(memory_percent|gpu\.\d+\.memoryAllocated)",
              x="RelativeTime(Process)"),
    )),
)


def anchored(regex):
    """W&B searches a metric regex anywhere in a key: anchor it, so that `train/loss` is not also `train/loss_d8`."""
    return f"^{regex}$"


def build_workspace(entity, project, name=DEFAULT_NAME, group_by=GROUP_BY):
    """The view as a `wandb_workspaces.workspaces.Workspace` (nothing is sent): SECTIONS in order, each open, the
    runs grouped by the config keys `group_by` (none: each run on its own), no auto-generated panels."""
    ws, wr = import_workspaces()
    sections = [ws.Section(name=title, panels=[panel(spec, wr) for spec in specs], is_open=True)
                for title, specs in SECTIONS]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                        runset_settings=ws.RunsetSettings(groupby=[ws.Config(key) for key in group_by]),
                        auto_generate_panels=False)


def panel(spec, wr):
    if isinstance(spec, Lines):
        return wr.LinePlot(title=spec.title, x=spec.x, metric_regex=anchored(spec.regex))
    if isinstance(spec, Chart):  # the panel the run page shows for the chart (its config's _wandb.visualize entry)
        return wr.CustomChart(query={"summaryTable": {"tableKey": f"{spec.key}_table"}}, chart_name=LINESERIES,
                              chart_fields={"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"},
                              chart_strings={"title": spec.title, "xname": "log2(dim)"})
    if isinstance(spec, Media):
        return wr.MediaBrowser(title=spec.title, media_keys=list(spec.keys))
    if isinstance(spec, Table):
        return wr.WeavePanelSummaryTable(table_name=spec.key)
    if isinstance(spec, RunDiff):
        return wr.RunComparer(diff_only="split")
    raise TypeError(f"unknown panel {spec!r}")


def import_workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise UserError(f"saving a W&B workspace needs wandb-workspaces: pip install {WORKSPACES_REQUIREMENT}")
    return ws, wr


def save_workspace(workspace):
    """Save the view to W&B (a new view each time); returns its URL. No login, or no W&B at the other end: one
    UserError line."""
    import requests
    import wandb

    try:
        wandb.Api(timeout=30)  # fails early, and clearly, without an API key or a reachable server
        return workspace.save().url
    except wandb.errors.UsageError as e:  # no API key
        raise UserError(f"W&B: {e} (or set WANDB_API_KEY)") from None
    except (wandb.errors.Error, requests.RequestException, OSError) as e:  # unreachable, refused, no such project
        raise UserError(f"W&B: could not save the workspace to {workspace.entity}/{workspace.project}: "
                        f"{' '.join(str(e).split())}") from None


def get_args_parser():
    parser = script.ArgumentParser("python -m mrl.report.workspace", description=__doc__)
    parser.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"),
                        help="W&B user or team that owns the project (default: $WANDB_ENTITY)")
    parser.add_argument("--project", default=DEFAULT_PROJECT, help="W&B project of the runs")
    parser.add_argument("--name", default=DEFAULT_NAME, help="the view's name in the workspace menu")
    parser.add_argument("--group_by", nargs="*", default=list(GROUP_BY), metavar="KEY",
                        help="config keys to group the runs by (none: every run on its own); train_ssl.py runs "
                             "differ by 'method'")
    return parser


def main(args):
    if not args.entity:
        raise UserError("give --entity (your W&B user or team name) or set WANDB_ENTITY")
    workspace = build_workspace(args.entity, args.project, args.name, args.group_by)
    print(f"saved the workspace view '{args.name}' of {args.entity}/{args.project}: {save_workspace(workspace)}")


if __name__ == "__main__":
    script.run(main, get_args_parser().parse_args())
