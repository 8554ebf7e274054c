"""W&B through Accelerate's tracker API: one run per training run, continued after a resume.

Everything is logged at an explicit, monotonic step -- the optimizer step -- so train and validation series share
one x-axis and W&B never drops a row logged at an older step. Without `--report_to wandb` these are no-ops.
"""

import os
import uuid


def init_tracking(accelerator, args, state, config):
    """Start the W&B run; its id lives in `state` (checkpointed), so a resumed run continues the same run page."""
    if args.report_to != "wandb":
        return
    state.wandb_run_id = state.wandb_run_id or uuid.uuid4().hex[:8]
    init_kwargs = {"name": args.run_name, "id": state.wandb_run_id, "resume": "allow",
                   "dir": os.environ.get("WANDB_DIR", args.output_dir)}
    accelerator.init_trackers(args.wandb_project, config=config, init_kwargs={"wandb": init_kwargs})


def log_per_dim_table(accelerator, key, dims, columns, step):
    """A W&B table with one row per dim and a line plot of each column against the dim."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    import wandb

    names = list(columns)
    table = wandb.Table(columns=["dim"] + names, data=[[d] + [columns[n][i] for n in names] for i, d in enumerate(dims)])
    plots = {f"{key}/{n}_vs_dim": wandb.plot.line(table, "dim", n, title=f"{n} vs dim") for n in names}
    accelerator.log({key: table, **plots}, step=step)


def log_image_files(accelerator, images, step):
    """Log PNG files (already written to the output dir) as W&B images: {key: path}."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    import wandb

    accelerator.log({key: wandb.Image(path) for key, path in images.items()}, step=step)


def log_summary(accelerator, metrics):
    """Set W&B summary values (the numbers shown on the run page and in the runs table): {key: number}."""
    if not (accelerator.is_main_process and accelerator.trackers):
        return
    accelerator.get_tracker("wandb", unwrap=True).summary.update(metrics)
