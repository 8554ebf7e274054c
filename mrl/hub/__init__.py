"""Sharing runs: the model card (model_card) and the MRL paper's released checkpoints as run folders
(`python -m mrl.hub.convert_reference`). Loading a run as a model is mrl.pretrained.MatryoshkaEncoder."""
