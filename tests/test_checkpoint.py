import json
import os

import pytest
import torch
from accelerate import Accelerator

from mrl import UserError
from mrl.matryoshka import MatryoshkaClassifier, MatryoshkaHeads
from mrl.models.backbones import build_backbone
from mrl.run_folder.final_model import load_model, save_model
from mrl.run_folder.layout import list_checkpoints
from mrl.train.checkpoint import TrainState, resolve_checkpoint, save_checkpoint

CONFIG = {"kind": "supervised", "model": {"backbone": "resnet18", "embed_dim": 512, "cifar_stem": True},
          "heads": {"dims": [8, 64, 512], "num_classes": 4, "tied": True},
          "data": {"dataset": "digits", "image_size": 16}}


@pytest.fixture
def accelerator():
    return Accelerator(cpu=True)


def test_saved_model_loads_back_identical(tmp_path, accelerator):
    torch.manual_seed(0)
    model = MatryoshkaClassifier(build_backbone("resnet18", 16), MatryoshkaHeads([8, 64, 512], 4, tied=True)).eval()
    save_model(accelerator, model, tmp_path, CONFIG)
    backbone, heads, config = load_model(tmp_path)
    assert config["heads"]["dims"] == [8, 64, 512] and not backbone.training
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z, logits = model(x)
        torch.testing.assert_close(backbone(x), z)
        torch.testing.assert_close(heads(backbone(x)), logits)


def test_load_model_errors_are_one_line_and_specific(tmp_path, accelerator):
    with pytest.raises(UserError, match="config.json is missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "format_version": 99}))
    with pytest.raises(UserError, match="format version 99"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, "format_version": 1}))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model(tmp_path)


def test_checkpoints_rotate_and_resolve(tmp_path, accelerator):
    accelerator.prepare(torch.nn.Linear(3, 2))
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    for step in (5, 10, 15):
        state.step = step
        save_checkpoint(accelerator, tmp_path, step, keep=2)
    names = [os.path.basename(p) for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000010", "step_00000015"]
    os.makedirs(tmp_path / "checkpoints" / "step_00000020.tmp")  # a save that was killed half-way is ignored
    assert resolve_checkpoint(tmp_path, "latest").endswith("step_00000015")
    assert resolve_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(UserError, match="not a checkpoint of this repo"):
        resolve_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step_00000020.tmp"))
    state.step = 0
    accelerator.load_state(resolve_checkpoint(tmp_path, "latest"))
    assert state.step == 15
