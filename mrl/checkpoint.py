"""Saving and loading: the final model that evaluate.py reads, and the training checkpoints a run resumes from.

A finished run's `--output_dir` holds `model.safetensors` (keys `backbone.*`, and `heads.*` for supervised runs)
and `config.json` (everything needed to rebuild the model and its preprocessing). Training checkpoints are
Accelerate `save_state` folders under `checkpoints/step_<optimizer step>`.
"""

import json
import os
import re
import shutil

from safetensors.torch import load_file

from mrl import UserError
from mrl.distributed import unwrap
from mrl.models import MatryoshkaHeads, build_backbone
from mrl.run_config import CONFIG_FILE, FORMAT_VERSION, weight_prefixes, write_config

MODEL_FILE = "model.safetensors"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    once the checkpoint is complete (the Hub upload of --hub_push_checkpoints: mrl.publish.checkpoint_pusher).
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    final = os.path.join(root, f"step_{step:08d}")
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


def list_checkpoints(output_dir):
    """Complete checkpoint folders of a run, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in steps]


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
    if not os.path.isfile(os.path.join(resume_from, "custom_checkpoint_0.pkl")):
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
    return [MODEL_FILE, "optimizer.bin", f"random_states_{accelerator.process_index}.pkl", "custom_checkpoint_0.pkl"]


def save_model(accelerator, model, output_dir, config):
    """The trained model as safetensors plus the JSON config that load_model rebuilds it from. The keys are the
    module's own: without DDP's `module.` and torch.compile's `_orig_mod.`."""
    accelerator.save_model(unwrap(accelerator, model), output_dir)
    if accelerator.is_main_process:
        # safetensors writes through a private temporary file (mode 0600); give it the mode of every other output
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(output_dir, MODEL_FILE), 0o666 & ~umask)
        write_config(output_dir, config)


def is_checkpoint(path):
    """Whether `path` is one of a run's training checkpoints (checkpoints/step_N) rather than a finished run."""
    return os.path.isfile(os.path.join(path, "custom_checkpoint_0.pkl"))


def checkpoint_run_dir(path):
    return os.path.dirname(os.path.dirname(os.path.abspath(path)))


def read_config(path):
    """The config.json of a finished run folder, or of the run a checkpoint folder belongs to."""
    folder = checkpoint_run_dir(path) if is_checkpoint(path) else path
    file = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(file):
        if is_checkpoint(path):
            raise UserError(f"{path} is a training checkpoint, but its run folder {folder} has no {CONFIG_FILE} (runs "
                            "of earlier versions wrote it only at the end): resume the run to finish it, then "
                            "evaluate the run folder")
        raise UserError(f"{path} is not a trained model folder: {CONFIG_FILE} is missing")
    with open(file) as f:
        config = json.load(f)
    if config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{file} has format version {config.get('format_version')}; this code reads {FORMAT_VERSION}")
    return config


def load_model(path, device="cpu"):
    """(backbone, heads or None, config) of a model saved by save_model, or of a training checkpoint of a run
    (checkpoints/step_N), in eval mode."""
    config = read_config(path)
    weights = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(weights):
        raise UserError(f"{path} has {CONFIG_FILE} but no {MODEL_FILE}: the run has not finished (or was stopped)"
                        + _checkpoint_hint(path))
    try:
        state = load_file(weights, device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(f"{weights} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}): the file is "
                        "damaged or incomplete; copy it again, or evaluate one of the run's checkpoints") from None
    state = without_wrapper_prefixes(state)
    backbone_prefix, heads_prefix = weight_prefixes(config, is_checkpoint(path))
    backbone, heads = build_model(config)
    backbone.load_state_dict(_with_prefix(state, backbone_prefix))
    if heads is not None:
        heads.load_state_dict(_with_prefix(state, heads_prefix))
    for module in (backbone, heads):
        if module is not None:
            module.to(device).eval()
    return backbone, heads, config


def without_wrapper_prefixes(state):
    """`state` with the key prefixes that wrappers add removed: torch.compile's `_orig_mod.` and DDP's `module.`
    (model.safetensors of runs trained with a dynamo backend by earlier versions holds `_orig_mod.` keys)."""
    return {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in state.items()}


def build_model(config):
    """(backbone, heads or None) with the architecture a config.json describes, freshly initialized."""
    model_cfg = config["model"]
    backbone = build_backbone(model_cfg["backbone"], config["data"]["image_size"], model_cfg.get("cifar_stem"),
                              model_cfg.get("norm", "batch"),  # runs of earlier versions: BatchNorm
                              blurpool=model_cfg.get("blurpool", False),  # and no BlurPool
                              embed_dim=model_cfg.get("projection"), timm=model_cfg.get("timm"))  # nor timm
    heads = None
    if config.get("heads"):
        heads = MatryoshkaHeads(config["heads"]["dims"], config["heads"]["num_classes"], config["heads"]["tied"])
    return backbone, heads


def _checkpoint_hint(path):
    found = list_checkpoints(path)
    return f"; evaluate its newest checkpoint, {found[-1]}, or resume it" if found else ""


def _with_prefix(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

