"""What a run folder (a training script's --output_dir) holds, by name: every file and folder a run, its evaluation
or its embedding writes there is a constant of this module, and nothing else spells them.

    model.safetensors, config.json    the final model (mrl.run_folder.final_model) and what rebuilds it (.config)
    checkpoints/step_<N>/             resumable training checkpoints (mrl.train.checkpoint)
    metrics.json, *.png, README.md    the training script's results, plots and model card
    eval/, features/, embeddings/     evaluate.py's results and feature cache, embed.py's default output
    PREEMPTED, wandb_flushed.json     a preempted run's marker; how much of the W&B page is complete
"""

import os
import re

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"  # the model card: the README.md the Hugging Face Hub shows
CHECKPOINTS = "checkpoints"
CHECKPOINT_STATE = "custom_checkpoint_0.pkl"  # in a checkpoint folder: the TrainState, the first registered object
EVAL_DIR = "eval"  # evaluate.py --output_dir default
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"  # in EVAL_DIR
FEATURES_DIR = "features"  # evaluate.py's feature cache
EMBEDDINGS_DIR = "embeddings"  # embed.py --output_dir default
# Written next to the checkpoint when a preemption stopped the run, for when a launcher turns exit status 75 into its
# own (`accelerate launch` and torchrun exit with 1 when a process fails); removed when the run starts again.
PREEMPTED_MARKER = "PREEMPTED"
FLUSHED_FILE = "wandb_flushed.json"  # the step through which a finished run's W&B page is complete
ACCURACY_PLOT = "accuracy_vs_dim.png"  # train_supervised.py: the heads' accuracy against dim
KNN_PLOT = "knn_accuracy_vs_dim.png"  # train_ssl.py: kNN accuracy against dim
PCA_PLOT = "pca_val.png"  # train_supervised.py: PCA of validation embedding prefixes

# What a run writes into its --output_dir: all of it goes when --overwrite replaces the run (and nothing else there).
RUN_OUTPUTS = (CHECKPOINTS, EVAL_DIR, FEATURES_DIR, MODEL_FILE, CONFIG_FILE, METRICS_FILE, CARD_FILE, PREEMPTED_MARKER,
               FLUSHED_FILE, ACCURACY_PLOT, PCA_PLOT, KNN_PLOT)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(output_dir, step):
    return os.path.join(output_dir, CHECKPOINTS, f"step_{step:08d}")


def list_checkpoints(output_dir):
    """Complete checkpoint folders of a run, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := _STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def is_checkpoint(path):
    """Whether `path` is one of a run's training checkpoints (checkpoints/step_N) rather than a finished run."""
    return os.path.isfile(os.path.join(path, CHECKPOINT_STATE))


def checkpoint_run_dir(path):
    """The run folder a checkpoint folder belongs to."""
    return os.path.dirname(os.path.dirname(os.path.abspath(path)))
