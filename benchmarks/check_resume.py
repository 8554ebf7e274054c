#!/usr/bin/env python
"""A 2-epoch mixed-precision run of train_ssl.py and of train_supervised.py, each resumed from a mid-epoch checkpoint
and compared with its uninterrupted run: what the GPU session checks for fp16 (benchmarks/gpu_session.sh).

For each script: the uninterrupted run (a checkpoint every --checkpointing_steps optimizer steps, the train loss
logged at every step), then a second run started from the last checkpoint taken mid-way through an epoch. Every
value the scripts log (accelerator.log) is recorded in this process, so no W&B is needed. Printed per script:

  - whether every train loss (and the final validation losses) is finite;
  - the optimizer steps the fp16 grad scaler skipped (train/skipped_steps), which should all be among the first few
    while the scaler finds its scale;
  - the resumed run against the uninterrupted one over the steps after the checkpoint: on a CPU bit-identical; on a
    GPU close, not bit-identical (cuDNN's and atomics' summation order varies from run to run), so the
    differences are printed as numbers;
  - the final weights and metrics of the two runs.

    python benchmarks/check_resume.py --precision fp16 --dataset_path data/cifar10 --max_train_samples 5120
    python benchmarks/check_resume.py --precision no --dataset digits --image_size 8 --max_train_samples 96 \\
        --batch_size 16 --checkpointing_steps 4                                            # a CPU check of this script
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_ssl  # noqa: E402
import train_supervised  # noqa: E402
from mrl.run_folder.layout import list_checkpoints

SCRIPTS = {"ssl": train_ssl, "supervised": train_supervised}
RECORDS = []  # (step, values) of every accelerator.log call of the run in progress
_log = Accelerator.log


def recording_log(self, values, step=None, log_kwargs=None):
    if self.is_main_process:
        RECORDS.append((step, dict(values)))
    return _log(self, values, step=step, log_kwargs=log_kwargs or {})


Accelerator.log = recording_log


def run(script, argv):
    """script.main in this process (Accelerate's process-wide state reset around it); returns its logged values."""
    args = SCRIPTS[script].get_args_parser().parse_args([str(a) for a in argv])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    RECORDS.clear()
    start = time.perf_counter()
    try:
        SCRIPTS[script].main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return list(RECORDS), time.perf_counter() - start


def train_losses(records):
    return {step: values["train/loss"] for step, values in records if "train/loss" in values}


def skipped_steps(records):
    """The optimizer steps at which the fp16 grad scaler skipped the update."""
    counts = sorted((step, values["train/skipped_steps"]) for step, values in records if "train/skipped_steps" in values)
    previous, skipped = 0, []
    for step, count in counts:
        skipped += [step] * (count - previous)
        previous = count
    return skipped


def mid_epoch_checkpoint(output_dir, steps_per_epoch):
    """The last checkpoint saved part-way through an epoch, with its TrainState."""
    for path in reversed(list_checkpoints(output_dir)):
        state = torch.load(os.path.join(path, "custom_checkpoint_0.pkl"), weights_only=False)
        if state["step"] % steps_per_epoch:
            return path, state
    raise SystemExit(f"no mid-epoch checkpoint in {output_dir}: lower --checkpointing_steps")


def relative(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def check(script, common, output_dir, first_steps):
    full_dir, resumed_dir = os.path.join(output_dir, f"{script}_full"), os.path.join(output_dir, f"{script}_resumed")
    shutil.rmtree(full_dir, ignore_errors=True), shutil.rmtree(resumed_dir, ignore_errors=True)
    full, full_seconds = run(script, [*common, "--output_dir", full_dir])
    checkpoint, state = mid_epoch_checkpoint(full_dir, max(train_losses(full)) // 2)  # both epochs step alike
    shutil.copytree(checkpoint, os.path.join(resumed_dir, "checkpoints", os.path.basename(checkpoint)))
    resumed, resumed_seconds = run(script, [*common, "--output_dir", resumed_dir, "--resume_from_checkpoint", "latest"])

    losses, again = train_losses(full), train_losses(resumed)
    finite = all(math.isfinite(v) for v in [*losses.values(), *again.values()])
    metrics = [json.load(open(os.path.join(d, "metrics.json"))) for d in (full_dir, resumed_dir)]
    if script == "supervised":
        finite = finite and all(math.isfinite(v) for m in metrics for v in m["val"]["loss"])
        final = [m["val"]["accuracy"] for m in metrics]
    else:
        final = [m["knn_accuracy"] for m in metrics]
    skipped = skipped_steps(full)
    steps = sorted(again)
    diffs = [relative(losses[s], again[s]) for s in steps]
    weights = [load_file(os.path.join(d, "model.safetensors")) for d in (full_dir, resumed_dir)]
    weight_diff = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0])
    identical = all(losses[s] == again[s] for s in steps) and weight_diff == 0

    print(f"\n=== {script}: {len(losses)} optimizer steps in 2 epochs ({full_seconds:.0f} s), resumed from "
          f"{os.path.basename(checkpoint)} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']}), "
          f"{len(steps)} steps after it ({resumed_seconds:.0f} s)")
    print(f"finite losses: {'yes' if finite else 'NO'}")
    print(f"skipped steps (fp16 grad scaler): {len(skipped)} {skipped[:20]}; "
          f"{'all' if all(s <= first_steps for s in skipped) else 'NOT all'} within the first {first_steps} steps")
    print(f"resumed vs uninterrupted train loss, steps {steps[0]}..{steps[-1]}: first step {losses[steps[0]]:.6f} vs "
          f"{again[steps[0]]:.6f}, max relative difference {max(diffs):.2e} (first 5 steps {max(diffs[:5]):.2e})")
    print(f"final weights: max |difference| {weight_diff:.3e}; final per-dim "
          f"{'val accuracy' if script == 'supervised' else 'kNN accuracy'}: "
          f"{' '.join(f'{a:.3f}' for a in final[0])} vs {' '.join(f'{a:.3f}' for a in final[1])}")
    print(f"verdict {script}: {'bit-identical resume' if identical else 'resume differs'}, "
          f"{'finite' if finite else 'NON-FINITE'}, {len(skipped)} skipped step(s)")
    return finite and all(s <= first_steps for s in skipped)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", default="ssl,supervised", help="comma-separated: ssl, supervised")
    parser.add_argument("--precision", default="fp16", choices=("no", "fp16", "bf16"), help="mixed precision")
    parser.add_argument("--dataset", default="cifar10", help="a dataset preset of the scripts")
    parser.add_argument("--dataset_path", default=None, help="a local copy (the GPU machine has no Hub access)")
    parser.add_argument("--image_size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--max_train_samples", type=int, default=5120, help="a subset of the train split")
    parser.add_argument("--max_eval_samples", type=int, default=1000, help="validation (and kNN bank) images")
    parser.add_argument("--batch_size", type=int, default=256, help="global batch of both scripts")
    parser.add_argument("--checkpointing_steps", type=int, default=7, help="a checkpoint every N optimizer steps")
    parser.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--first_steps", type=int, default=10, help="skipped steps are expected only up to this step")
    parser.add_argument("--ssl_args", default="--method relic --data_on_device",
                        help="more train_ssl.py flags (space-separated)")
    parser.add_argument("--supervised_args", default="--grad_accum_steps 1 --lr 1e-3 --memory_format channels_last",
                        help="more train_supervised.py flags (space-separated)")
    parser.add_argument("--output_dir", default="runs/check_resume", help="the runs go here (replaced)")
    args = parser.parse_args()

    os.environ["ACCELERATE_MIXED_PRECISION"] = args.precision  # what `accelerate launch --mixed_precision` sets
    common = ["--dataset", args.dataset, "--max_train_samples", args.max_train_samples, "--max_eval_samples",
              args.max_eval_samples, "--batch_size", args.batch_size, "--epochs", 2, "--checkpointing_steps",
              args.checkpointing_steps, "--checkpoints_total_limit", 1000, "--log_every", 1, "--report_to", "none",
              "--num_workers", args.num_workers]
    common += ["--dataset_path", args.dataset_path] if args.dataset_path else []
    common += ["--image_size", args.image_size] if args.image_size else []
    extra = {"ssl": [*args.ssl_args.split(), "--knn_every", 0, "--knn_bank_samples", args.max_eval_samples],
             "supervised": args.supervised_args.split()}
    print(f"check_resume: precision {args.precision}, {args.dataset} ({args.max_train_samples} train images), batch "
          f"{args.batch_size}, device {'cuda (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else 'cpu'}, "
          f"torch {torch.__version__}")
    ok = [check(script, [*common, *extra[script]], args.output_dir, args.first_steps)
          for script in args.scripts.split(",") if script]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
