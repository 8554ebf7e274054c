"""Contrastive losses on two gloo processes mean what they mean on one: the same loss and, after DDP's gradient
averaging, the same parameter gradients for the same global batch and weights. And their logits stay float32
under bf16 autocast."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from mrl.losses import nt_xent_loss, relic_loss
from mrl.projectors import Projector
from train_ssl import SSLModel

GLOBAL_BATCH, WORLD = 8, 2


class TinyBackbone(nn.Module):
    """No BatchNorm: per-process BatchNorm statistics would differ from one process's by design (see --sync_bn)."""

    def __init__(self):
        super().__init__()
        self.net, self.embed_dim = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh()), 16

    def forward(self, x):
        return self.net(x)


def build(method):
    torch.manual_seed(0)
    model = SSLModel(method, TinyBackbone(), Projector(16, 12, 6, batchnorm=False), [4, 8, 16], [1.0, 0.5, 1.0],
                     ema_momentum=[0.9] * 4)
    if model.log_temperature is not None:
        model.log_temperature.data.fill_(math.log(3.0))  # an inner value of the clamp: its gradient counts too
    if model.target is not None:  # a target that differs from the online network, as after some training
        for p in model.target.module.parameters():
            p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def views():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g), torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g)


def loss_and_gradients(model, v1, v2):
    loss, _ = model(v1, v2)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def worker(rank, method, rendezvous, results):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(build(method))
        v1, v2 = views()
        rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)  # split_batches: contiguous
        loss, grads = loss_and_gradients(model, v1[rows], v2[rows])
        dist.all_reduce(loss)  # what the scripts log: the mean over processes
        results[rank] = (loss.item() / WORLD, {n.removeprefix("module."): g for n, g in grads.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["relic", "simclr"])
def test_two_processes_give_the_one_process_loss_and_gradients(method, tmp_path):
    one_loss, one_grads = loss_and_gradients(build(method), *views())
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(method, str(tmp_path / "rendezvous"), results), nprocs=WORLD)
        results = dict(results)
    for rank in range(WORLD):
        loss, grads = results[rank]
        assert loss == pytest.approx(one_loss.item(), rel=1e-5)
        assert grads.keys() == one_grads.keys()
        for name, grad in one_grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)  # atol: float32 rounding near 0


def test_without_gathering_the_split_loss_would_be_another_objective():
    # What the gather fixes: each half on its own compares an image with 3 negatives instead of 7.
    model = build("simclr")
    v1, v2 = views()
    with torch.no_grad():
        full = model(v1, v2)[0].item()
        halves = [model(v1[i:i + 4], v2[i:i + 4])[0].item() for i in (0, 4)]
    assert abs(sum(halves) / 2 - full) > 0.05


@pytest.mark.parametrize("loss", ["relic", "nt_xent"])
def test_similarity_logits_are_float32_under_bf16_autocast(loss):
    g = torch.Generator().manual_seed(5)
    # bf16-representable inputs, so only the loss's own arithmetic can differ
    x, y = (torch.randn(16, 32, generator=g).bfloat16().float() for _ in range(2))
    fn = (lambda a, b: relic_loss(a, b, torch.tensor(math.log(5.0)))) if loss == "relic" else nt_xent_loss
    plain = fn(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fn(x, y)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(plain.item(), rel=2e-6)
