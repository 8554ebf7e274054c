"""Stopping a run safely: on preemption signals, and on a loss that is no longer finite."""

import signal

import torch

from mrl import UserError

# Exit status of a run stopped by a preemption signal after saving its checkpoint: EX_TEMPFAIL, "try again
# later". A job script can requeue on it (see examples/slurm.sh).
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """Raised after the checkpoint is saved; cli.run turns it into a message and PREEMPTED_EXIT_CODE."""


class NonFiniteLoss(UserError):
    pass


class Preemption:
    """SIGTERM and SIGUSR1 (what Slurm and most schedulers send some time before killing a job) ask the run to
    save a checkpoint at the next optimizer step and exit. The handler only sets a flag, so a step is never cut
    in half; `requested` agrees across processes, so all of them stop at the same step even when only one
    received the signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self, accelerator):
        if accelerator.num_processes == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "max").item())


class LossGuard:
    """Remembers the first optimizer step whose loss was NaN or infinite, without a device sync per step.
    `check` (called before logging and before saving) raises NonFiniteLoss naming that step, so a diverged model
    never replaces the last good checkpoint."""

    def __init__(self, device):
        self.first_bad_step = torch.tensor(-1, device=device)

    def update(self, loss, step):
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        # torch.full_like fills on the device; torch.tensor(step, device=cuda) would copy from the host and sync
        self.first_bad_step = torch.where(bad, torch.full_like(self.first_bad_step, step), self.first_bad_step)

    def check(self, accelerator):
        steps = [s for s in accelerator.gather(self.first_bad_step.reshape(1)).tolist() if s >= 0]
        if steps:
            raise NonFiniteLoss(f"the loss became NaN or infinite at optimizer step {min(steps)}; stopped without "
                                "saving, so the last checkpoint is the last good one (try a lower --lr)")
