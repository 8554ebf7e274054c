"""The training-loop bookkeeping of mrl/train/loop.py against a plain PyTorch loop."""

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from mrl.matryoshka import MatryoshkaClassifier, MatryoshkaHeads, per_head_cross_entropy
from mrl.train.loop import accumulation_scale, training_step


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accumulation_scale_is_one_except_in_an_incomplete_last_group():
    # 5 micro-batches, groups of 2: [0 1] [2 3] [4] -> the lone last one counts fully
    assert [accumulation_scale(b, 5, 2) for b in range(5)] == [1, 1, 1, 1, 2]
    assert [accumulation_scale(b, 7, 3) for b in range(7)] == [1] * 6 + [3]
    assert [accumulation_scale(b, 8, 3) for b in range(8)] == [1] * 6 + [1.5, 1.5]
    assert [accumulation_scale(b, 4, 1) for b in range(4)] == [1] * 4


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.embed_dim = nn.Linear(6, 4), 4

    def forward(self, x):
        return self.fc(x)


def make_model():
    torch.manual_seed(0)
    return MatryoshkaClassifier(Linear(), MatryoshkaHeads([2, 4], 3))


@pytest.mark.parametrize("batches,accumulation", [(5, 2), (7, 3)])
def test_an_epochs_last_incomplete_group_steps_on_the_mean_of_its_micro_batches(batches, accumulation,
                                                                                 fresh_accelerate_state):
    g = torch.Generator().manual_seed(1)
    data = [{"pixel_values": torch.randn(4, 6, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(batches)]
    weights, lr = torch.tensor([1.0, 0.5]), 0.5

    # a plain loop: each optimizer step on the mean loss of the micro-batches of its group
    plain = make_model()
    plain_optimizer = torch.optim.SGD(plain.parameters(), lr=lr)
    for start in range(0, batches, accumulation):
        group = data[start:start + accumulation]
        plain_optimizer.zero_grad()
        for batch in group:
            logits = plain(batch["pixel_values"])[1]
            per_dim = torch.stack([nn.functional.cross_entropy(h, batch["labels"]) for h in logits])
            ((weights * per_dim).sum() / len(group)).backward()
        plain_optimizer.step()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(data, batch_size=None)  # each item is already a batch
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps = 0

    def forward(batch):  # train_supervised.py's loss
        per_dim = per_head_cross_entropy(model(batch["pixel_values"])[1], batch["labels"])
        return (weights * per_dim).sum(), per_dim

    for b, batch in enumerate(loader):
        training_step(accelerator, model, optimizer, forward, batch, lr, 0.0, steps,
                      accumulation_scale(b, len(loader), accumulation))
        steps += accelerator.sync_gradients
    assert steps == -(-batches // accumulation)
    for ours, reference in zip(accelerator.unwrap_model(model).parameters(), plain.parameters()):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
