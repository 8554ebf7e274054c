"""The training checkpoints a run resumes from: Accelerate `save_state` folders under `checkpoints/step_<optimizer
step>` (model, optimizer, RNG states, and the TrainState of where the run is). The final model a finished run leaves
is another format: mrl.run_folder.final_model.
"""

import os
import shutil

from mrl import UserError
from mrl.run_folder.layout import CHECKPOINT_STATE, CHECKPOINTS, MODEL_FILE, checkpoint_dir, list_checkpoints


class TrainState:
    """Where a run is: registered with `accelerator.register_for_checkpointing`, so it is saved and restored
    with the model and optimizer. `batch_in_epoch` counts the batches already consumed this epoch (what a
    mid-epoch resume skips); `wandb_run_id` lets a resumed run continue the same W&B run page; `history` holds
    the per-epoch evaluation results, so metrics.json of a resumed run covers all epochs; `skipped_steps` counts
    the optimizer steps the fp16 grad scaler skipped."""

    def __init__(self):
        self.epoch, self.step, self.batch_in_epoch, self.wandb_run_id, self.history = 0, 0, 0, None, []
        self.skipped_steps = 0

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def save_checkpoint(accelerator, output_dir, step, keep, after_save=None):
    """`accelerator.save_state` into `checkpoints/step_<step>`, keeping the newest `keep` checkpoints.

    The state is written to a `.tmp` folder and renamed when complete, so a run killed while saving never leaves
    a folder that looks like a finished checkpoint. `after_save(folder)`, when given, runs on the main process
    once the checkpoint is complete (the Hub upload of --hub_push_checkpoints: mrl.train.publish.checkpoint_pusher).
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
        if after_save is not None:
            after_save(final)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir, resume_from):
    """The checkpoint folder `--resume_from_checkpoint` names: a path, or "latest" (None when there is none yet,
    so a preempted job can be relaunched with the same command from its first start)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume_from):
        raise UserError(f"--resume_from_checkpoint {resume_from} is not a folder")
    if not os.path.isfile(os.path.join(resume_from, CHECKPOINT_STATE)):
        raise UserError(f"--resume_from_checkpoint {resume_from} is not a checkpoint of this repo "
                        f"(expected a folder like {os.path.join(output_dir, CHECKPOINTS, 'step_00000100')})")
    return resume_from


def load_checkpoint(accelerator, output_dir, resume_from):
    """Restore everything `accelerator.save_state` saved (and the registered TrainState) from the checkpoint
    `--resume_from_checkpoint` names; returns its folder, or None for a fresh start.

    With "latest", a checkpoint that cannot be read (truncated by a kill, a full disk, bit rot) is reported and
    the one before it is tried; a checkpoint named by path must load.
    """
    first = resolve_checkpoint(output_dir, resume_from)
    if first is None:
        return None
    candidates = [first] if resume_from != "latest" else list(reversed(list_checkpoints(output_dir)))
    for path in candidates:
        try:
            missing = [f for f in _required_files(accelerator) if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(f"missing {', '.join(missing)}")
            accelerator.load_state(path)
            return path
        except Exception as e:  # safetensors, pickle and torch raise many types for damaged files
            problem = f"checkpoint {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            if resume_from != "latest":
                raise UserError(problem) from None
            accelerator.print(f"warning: {problem}; trying the previous one")
    raise UserError(f"no checkpoint in {os.path.join(output_dir, CHECKPOINTS)} can be loaded")


def _required_files(accelerator):
    # accelerate only warns when random states are missing, which would make the resume silently inexact
    return [MODEL_FILE, "optimizer.bin", f"random_states_{accelerator.process_index}.pkl", CHECKPOINT_STATE]
