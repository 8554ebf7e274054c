"""The EMA target network: update math, mrl-pytorch's copy/every knobs, the cosine gamma schedule, state."""

import pytest
import torch
import torch.nn as nn

from mrl.ssl.ema import EMA
from mrl.train.optim import cosine_schedule


def online_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def perturb(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(net.parameters()) + [net[1].running_mean, net[1].running_var]:
            t.add_(torch.randn(t.shape, generator=g))
        net[1].num_batches_tracked += 5


def test_update_is_the_exponential_moving_average_of_parameters_and_float_buffers():
    online = online_net()
    ema = EMA(online, momentum=[0.9] * 10, copy_until=1, every=1)
    assert all(not p.requires_grad for p in ema.parameters())
    perturb(online, 1)
    assert ema.update(online, 0) == 0.0  # steps 0..copy_until: the target is a copy
    for t, o in zip(ema.module.state_dict().values(), online.state_dict().values()):
        torch.testing.assert_close(t, o)
    ema.update(online, 1)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    perturb(online, 2)
    assert ema.update(online, 2) == pytest.approx(0.9)
    for key, o in online.state_dict().items():
        t = ema.module.state_dict()[key]
        if t.is_floating_point():
            torch.testing.assert_close(t, 0.9 * before[key] + 0.1 * o)
        else:
            assert t == o  # integer BN counters follow the online network
    assert int(ema.num_updates) == 3


def test_every_n_steps_and_the_schedule_index_by_optimizer_step():
    online = online_net()
    schedule = cosine_schedule(0.99, 1.0, epochs=2, steps_per_epoch=5)
    ema = EMA(online, schedule, copy_until=0, every=3)
    perturb(online, 3)
    kept = {k: v.clone() for k, v in ema.module.state_dict().items()}
    assert ema.update(online, 1) == 1.0 and ema.update(online, 2) == 1.0  # off steps: unchanged
    for k, v in ema.module.state_dict().items():
        if k != "num_batches_tracked":
            torch.testing.assert_close(v, kept[k])
    assert ema.update(online, 3) == pytest.approx(schedule[3])
    # the schedule rises from 0.99 to 1 on a half cosine (BYOL / mrl-pytorch)
    assert schedule[0] == pytest.approx(0.99) and schedule[-1] > schedule[5] > schedule[0] and schedule[-1] < 1.0
    assert schedule[5] == pytest.approx(1 - 0.01 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()) / 2)


def test_state_dict_round_trip_restores_weights_and_counter():
    online = online_net()
    ema = EMA(online, [0.5] * 10)
    for step in range(4):
        perturb(online, step)
        ema.update(online, step)
    restored = EMA(online_net(), [0.5] * 10)
    restored.load_state_dict(ema.state_dict())
    assert int(restored.num_updates) == 4
    for a, b in zip(restored.state_dict().values(), ema.state_dict().values()):
        torch.testing.assert_close(a, b)
