"""W&B through Accelerate's tracker API: one run page per training run, continued after a resume, and one per
evaluation.

Everything is logged at an explicit, monotonic step -- the optimizer step -- so train and validation series share
one x-axis and W&B never drops a row logged at an older step. Without `--report_to wandb` these are no-ops.

What a run page holds (docs/wandb.md lists it for the user):
  history   train/* (loss: the weighted sum over dims that is minimized, loss_mean_over_dims, loss_d{d}, lr,
            grad_norm), perf/* (throughput, data-wait), val/* or knn/* per dim, epoch
  summary   the last value of every series, plus the best (max) of each per-dim accuracy and the final test numbers
  charts    one native chart per metric, accuracy against log2(dim), one line per series (val/test, epochs, runs)
  config    the flags and what the code derived from them (embedding width, classes, split sizes, parameters, ...)
  artifact  the trained model (a reference to its files, for lineage: evaluation runs name it as their input)

A SIGKILL (out of memory, a lost node) loses what W&B had not yet written: the row of the current step (W&B keeps a
step open until a later one is logged) and whatever reached it since its last write to the run's file or the server
(every FLUSH_SECONDS). A resumed run therefore logs again the checkpoint's history rows -- the evaluation of each
epoch -- that the page may lack (`relog_history`).
"""

import json
import math
import netrc
import os
import time
import uuid
from urllib.parse import urlparse

from mrl import UserError
from mrl.run_folder.layout import CONFIG_FILE, FLUSHED_FILE, MODEL_FILE

# W&B writes an offline run's file and streams an online run's history this often (wandb 0.31's default
# x_transaction_log_flush_interval), and when the run finishes
FLUSH_SECONDS = 15.0
FLUSH_MARGIN = 5.0  # slack for a busy machine: wandb-core reads the records a moment after they are sent
_ACTIVE = {}  # the training run being logged: its output dir and TrainState, for finish_tracking / mark_preempting


def default_run_name(stem):
    """A W&B run name that differs between runs of the same command: `stem` (what was trained, on what) and the
    start time. The output folder stays the same, so that a relaunch finds its checkpoints."""
    return f"{stem}-{time.strftime('%m%d-%H%M%S')}"


def init_tracking(accelerator, args, state, config, job_type="train", relog=None):
    """Start the W&B run. Its id and name live in `state` (checkpointed), so a resumed run continues the same run
    page under the same name; `relog(row) -> {key: value}` turns a `state.history` row into what was logged for it,
    so that a resumed run can log again what the page lost (see `relog_history`)."""
    if args.report_to != "wandb":
        return
    state.wandb_run_id = state.wandb_run_id or uuid.uuid4().hex[:8]
    state.wandb_run_name = (args.run_name or getattr(state, "wandb_run_name", None)
                            or default_run_name(os.path.basename(os.path.normpath(args.output_dir))))
    wandb_dir = os.environ.get("WANDB_DIR", args.output_dir)
    os.makedirs(wandb_dir, exist_ok=True)
    init_kwargs = {"name": state.wandb_run_name, "id": state.wandb_run_id, "resume": "allow",
                   "dir": wandb_dir, "tags": args.wandb_tags or None,
                   "group": args.wandb_group, "job_type": args.wandb_job_type or job_type}
    accelerator.init_trackers(args.wandb_project, config=config, init_kwargs={"wandb": init_kwargs})
    if not accelerator.is_main_process:
        return
    run = accelerator.get_tracker("wandb", unwrap=True)
    # the runs table sorts by these: the best epoch of each per-dim accuracy next to its last value
    for pattern in ("val/accuracy_d*", "knn/accuracy_d*"):
        run.define_metric(pattern, summary="max,last")
    run.define_metric("val/loss*", summary="min,last")
    _ACTIVE.clear()
    if relog is not None:  # a training run
        _ACTIVE.update(output_dir=args.output_dir, state=state)
        if state.history:  # a resumed run
            relog_history(accelerator, args, state, relog, run)


def wandb_info(state, args):
    """What config.json records of the W&B run, so that evaluate.py can name the run and the model artifact it
    evaluates; None without W&B."""
    if args.report_to != "wandb" or state.wandb_run_id is None:
        return None
    return {"project": args.wandb_project, "run_id": state.wandb_run_id, "run_name": state.wandb_run_name,
            "model_artifact": model_artifact_name(state.wandb_run_id)}


def model_artifact_name(run_id):
    return f"model-{run_id}"


# ---- history rows that must not be lost: one per evaluation (validation, kNN), also kept in TrainState.history

def log_history_row(accelerator, state, values, step):
    """Log an evaluation row that `state.history` also keeps, and note which earlier rows are now surely on the
    page: a row is complete once a later step is logged (W&B commits a step when the next one starts; the next
    row's epoch logs its throughput before it, at a later step) and written within FLUSH_SECONDS of that. The
    note is saved with the next checkpoint, so a resumed run knows which rows it need not log again."""
    accelerator.log(values, step=step)
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    now = time.time()
    pending = getattr(state, "wandb_pending", []) + [[step, now]]
    flush = FLUSH_SECONDS + FLUSH_MARGIN
    done = [i for i in range(len(pending) - 1) if pending[i + 1][1] + flush <= now]
    if done:
        state.wandb_logged_through = pending[done[-1]][0]
        pending = pending[done[-1] + 1:]
    state.wandb_pending = pending


def rows_to_relog(history, logged_through, starting_step, offline):
    """The history rows a resumed run logs again. Online, W&B reports the step its copy of the run ends at
    (`starting_step`: the first step it has no row for): exactly the rows from there on are missing. Offline, the
    run's file cannot be asked; every row after the last one known to be written (`logged_through`) is logged
    again -- at worst a row written just before a SIGKILL shows twice, never none."""
    first = starting_step if not offline else logged_through + 1
    return [row for row in history if row["step"] >= first]


def relog_history(accelerator, args, state, relog, run):
    logged_through = getattr(state, "wandb_logged_through", -1)
    flushed = _read_flushed(args.output_dir, state.wandb_run_id)
    if flushed is not None:  # the previous segment finished its run page (a preemption, or the end)
        logged_through = max(logged_through, flushed)
    rows = rows_to_relog(state.history, logged_through, run.starting_step, run.settings.mode == "offline")
    state.wandb_logged_through, state.wandb_pending = logged_through, []
    for row in rows:
        log_history_row(accelerator, state, relog(row), step=row["step"])
    if rows:
        accelerator.print(f"W&B: logged again the evaluation rows of steps {[r['step'] for r in rows]}, which the run "
                          "page may have lost when the previous run was stopped")


def _read_flushed(output_dir, run_id):
    try:
        with open(os.path.join(output_dir, FLUSHED_FILE)) as f:
            flushed = json.load(f)
    except (OSError, ValueError):
        return None
    return flushed["step"] if flushed.get("run_id") == run_id else None


def finish_tracking(accelerator, preempted=False):
    """Finish the W&B run (marked preempted: to be resumed, not finished) and note in the output dir that its page
    now holds every row logged so far, which a resumed run need not log again."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    if preempted:
        run.mark_preempting()
    run.finish()  # accelerator.end_training() finishes it again: a no-op
    wandb.teardown()  # returns when W&B has written everything (finish alone may return before)
    state = _ACTIVE.get("state")
    if state is not None:
        with open(os.path.join(_ACTIVE["output_dir"], FLUSHED_FILE), "w") as f:
            json.dump({"run_id": state.wandb_run_id, "step": state.step}, f)


def mark_preempting(accelerator):
    """Show the W&B run as preempted (to be resumed), not as finished, when a preemption stops it."""
    finish_tracking(accelerator, preempted=True)


# ---- tables, charts, images, summary

def log_per_dim_table(accelerator, key, dims, columns, step, chart_key=None, title=None):
    """A W&B table with one row per dim (`key`), and one native chart (`chart_key`) with each column as a line
    against log2(dim). columns: {name: [value per dim]} (None: not measured)."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    import wandb

    names = list(columns)
    table = wandb.Table(columns=["dim", "log2_dim"] + names,
                        data=[[d, math.log2(d)] + [columns[n][i] for n in names] for i, d in enumerate(dims)])
    logged = {key: table}
    if chart_key:
        logged[chart_key] = line_chart({name: (dims, values) for name, values in columns.items()}, title or key)
    accelerator.log(logged, step=step)


def line_chart(series, title, xname="log2(dim)"):
    """One native W&B line chart with a line per series, {name: (dims, values)}, against log2 of the dims (d = 8..64
    bunch up on a linear axis); None values are left out."""
    import wandb

    xs, ys, keys = [], [], []
    for name, (dims, values) in series.items():
        points = [(math.log2(d), v) for d, v in zip(dims, values) if v is not None]
        if points:
            xs.append([x for x, _ in points])
            ys.append([y for _, y in points])
            keys.append(name)
    return wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname=xname)


def log_charts(accelerator, charts, step):
    """Native line charts, {key: (title, {series name: (dims, values)})}."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    accelerator.log({key: line_chart(series, title) for key, (title, series) in charts.items()}, step=step)


def log_image_files(accelerator, images, step):
    """Log PNG files (already written to the output dir) as W&B images: {key: path}."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    import wandb

    accelerator.log({key: wandb.Image(path) for key, path in images.items()}, step=step)


def log_table(accelerator, key, rows, step):
    """A W&B table from a list of dicts with the same keys (the columns)."""
    if not (accelerator.is_main_process and accelerator.trackers) or not rows:
        return
    import wandb

    columns = list(rows[0])
    accelerator.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])}, step=step)


def log_summary(accelerator, metrics):
    """Set W&B summary values (the numbers shown on the run page and in the runs table): {key: number}."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    accelerator.get_tracker("wandb", unwrap=True).summary.update(metrics)


def update_config(accelerator, values):
    """Add or correct config values once they are known (evaluate.py resolves its data flags after the run starts)."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    accelerator.get_tracker("wandb", unwrap=True).config.update(values, allow_val_change=True)


def save_file(accelerator, path):
    """A file of the output dir (results.md) on the run page's Files tab."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    accelerator.get_tracker("wandb", unwrap=True).save(path, base_path=os.path.dirname(path), policy="now")


def log_model_artifact(accelerator, args, state, metadata):
    """The trained model as a W&B artifact of type "model", named after the run: a reference to its files in the
    output dir, model.safetensors and config.json (checksummed, not uploaded), so that the evaluation runs that use
    it show on the page as its consumers (lineage)."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    import wandb

    artifact = wandb.Artifact(model_artifact_name(state.wandb_run_id), type="model", metadata=metadata)
    for name in (MODEL_FILE, CONFIG_FILE):
        artifact.add_reference("file://" + os.path.abspath(os.path.join(args.output_dir, name)))
    accelerator.get_tracker("wandb", unwrap=True).log_artifact(artifact)


def use_model_artifacts(accelerator, trained):
    """Name the training runs' model artifacts as this (evaluation) run's inputs. W&B resolves an artifact by name
    only online; offline, the ids stay in the config (`trained_runs`) and `wandb sync` uploads the run as is."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    run = accelerator.get_tracker("wandb", unwrap=True)
    if run.settings.mode == "offline":
        return
    for info in trained:
        try:
            run.use_artifact(f"{info['project']}/{info['model_artifact']}:latest", type="model")
        except Exception as e:  # an artifact of another entity, deleted, or a run logged without W&B
            accelerator.print(f"W&B: could not link the model artifact {info['model_artifact']} ({e})")


def resolve_report_to(args):
    """--report_to auto -> wandb when W&B can log without asking anything, else none. An explicit --report_to wandb
    that W&B would answer with its interactive login prompt (which waits forever, or fails without a terminal)
    is refused here, before any work is done."""
    if args.report_to == "auto":
        args.report_to = "wandb" if wandb_configured() else "none"
    elif args.report_to == "wandb" and not wandb_configured():
        raise UserError("--report_to wandb, but W&B is not logged in on this machine: run `wandb login` (or set "
                        "WANDB_API_KEY), or set WANDB_MODE=offline to log locally and `wandb sync` later")


def wandb_configured():
    """Whether W&B can start a run without prompting: offline or disabled mode, an API key in the environment, or
    a login saved in the netrc file (what `wandb login` writes)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
