import numpy as np

from mrl.train.optim import constant_schedule, cosine_schedule, exponential_schedule


def test_exponential_schedule_is_exponential_lr_stepped_per_epoch():
    lr = exponential_schedule(4e-4, 0.85, epochs=3, steps_per_epoch=5)
    assert len(lr) == 15
    np.testing.assert_allclose(lr[[0, 4, 5, 9, 10, 14]], [4e-4, 4e-4, 3.4e-4, 3.4e-4, 2.89e-4, 2.89e-4])


def test_cosine_schedule_warms_up_then_decays_to_final():
    lr = cosine_schedule(1.0, 0.1, epochs=10, steps_per_epoch=10, warmup_epochs=2)
    assert len(lr) == 100
    assert lr[0] == 0.0 and np.all(np.diff(lr[:20]) > 0)
    assert lr[20] == 1.0 and np.all(np.diff(lr[20:]) <= 0)
    assert abs(lr[-1] - 0.1) < 1e-3
    # Rising schedules work too (EMA momentum from 0.99 towards 1).
    ema = cosine_schedule(0.99, 1.0, epochs=2, steps_per_epoch=50)
    assert ema[0] == 0.99 and ema[-1] > 0.9999 and np.all(np.diff(ema) >= 0)


def test_constant_schedule():
    assert np.all(constant_schedule(3e-4, 2, 7) == 3e-4) and len(constant_schedule(3e-4, 2, 7)) == 14
