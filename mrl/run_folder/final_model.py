"""The final model of a run: `model.safetensors` (keys `backbone.*`, and `heads.*` for supervised runs) beside
`config.json`, which rebuilds the architecture and its preprocessing -- what evaluate.py, embed.py and
MatryoshkaEncoder read. A training checkpoint's model (checkpoints/step_N) loads the same way.
"""

import os

from safetensors.torch import load_file

from mrl import UserError
from mrl.matryoshka import MatryoshkaHeads
from mrl.models.backbones import build_backbone
from mrl.run_folder.config import read_config, weight_prefixes, write_config
from mrl.run_folder.layout import CONFIG_FILE, MODEL_FILE, is_checkpoint, list_checkpoints
from mrl.utils.distributed import unwrap


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
