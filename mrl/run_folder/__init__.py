"""A run folder (a training script's --output_dir): the names of what it holds (layout), config.json (config) and
the final model (final_model). Resumable checkpoints are mrl.train.checkpoint's."""
