"""Stopping a run safely: on preemption signals, and on a loss that is no longer finite."""

import ctypes
import json
import os
import signal
import time

import torch
import torch.distributed as dist

from mrl import UserError

# PREEMPTED_NOTICE_ENV: set by `python -m mrl.train.supervise`, a file to write the marker to as well, so that it can
# exit with PREEMPTED_EXIT_CODE whatever status the launcher in between reports
from mrl.run_folder.layout import PREEMPTED_MARKER
from mrl.train.supervise import PREEMPTED_NOTICE_ENV
from mrl.utils.distributed import process_group_timeout
from mrl.utils.script import PREEMPTION_SIGNALS


class NonFiniteLoss(UserError):
    pass


class Preemption:
    """SIGTERM, SIGUSR1 (what Slurm, Kubernetes, `timeout` and `docker stop` send some time before killing a job)
    and SIGINT (Ctrl-C) ask the run to save a checkpoint at the next optimizer step and exit. The handler only sets
    a flag, so a step is never cut in half; `requested` agrees across processes, so all of them stop at the same step
    even when only one received the signal (on several processes, one optimizer step after the signal: see
    `requested`). A second Ctrl-C, a second or more after the first, aborts at once without saving.

    Schedulers signal the whole process group, DataLoader workers included: the workers ignore these signals
    (`ignore_signals_in_worker`, their worker_init_fn) and are shut down by the training process as usual. Under
    `accelerate launch`, which dies on SIGTERM without passing it on, the training process asks the kernel to send
    it SIGTERM when its launcher dies (`follow_launcher`).
    """

    def __init__(self, accelerator=None):
        self.received, self.received_at = None, 0.0
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._handle)
        follow_launcher()
        self.group, self.pending = None, None
        if accelerator is not None and accelerator.num_processes > 1:
            # the flags travel between the hosts' memories (gloo), never through the accelerator: reading a device
            # tensor would wait for every step queued on it. A collective: every process constructs a Preemption.
            self.group = host_group()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        # the same Ctrl-C can arrive twice within a moment: from the terminal and forwarded by torchrun
        if signum == signal.SIGINT and self.received is not None and time.monotonic() - self.received_at > 1.0:
            os.write(2, b"\naborted by a second Ctrl-C; nothing saved since the last checkpoint\n")
            os._exit(130)
        if self.received is None:
            self.received, self.received_at = name, time.monotonic()
            # os.write, not print: the handler may interrupt a print (tqdm's) in progress
            os.write(2, f"\n{name} received: saving a checkpoint after the current optimizer step"
                        f"{' (Ctrl-C again to abort without saving)' if signum == signal.SIGINT else ''}\n".encode())

    def requested(self, accelerator):
        """Whether to stop after this optimizer step. Called once per optimizer step by every process: on several
        processes each call sends this process's flag to the others without waiting (an asynchronous all-reduce on
        the host) and reads the combined flags sent one call earlier, which have arrived by then. So every process
        stops at the same step, one step after the first signal, and the step loop never blocks on the others."""
        if accelerator.num_processes == 1:
            return self.received is not None
        stop = False
        if self.pending is not None:
            work, flags = self.pending
            work.wait()
            stop = bool(flags[0] > 0)
        flags = torch.tensor([float(self.received is not None)])
        self.pending = (dist.all_reduce(flags, dist.ReduceOp.MAX, group=self.group, async_op=True), flags)
        return stop


def host_group():
    """A process group over which CPU tensors travel: the default one when it is gloo (CPU runs), else a gloo group
    beside NCCL's (with the same timeout)."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo", timeout=process_group_timeout())


LAUNCHERS = (b"accelerate", b"torchrun", b"torch.distributed.run")


def follow_launcher():
    """Under `accelerate launch` or torchrun (Linux): receive SIGTERM when the launcher process dies, so that a
    signal which killed only the launcher still reaches the training process and its checkpoint is saved."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            command = f.read().split(b"\0")
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # not Linux, or no /proc: nothing to follow
        return
    if not any(name in part for part in command[:3] for name in LAUNCHERS):
        return  # a shell or a scheduler: its exit must not stop the run (nohup)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def write_preempted_marker(output_dir, step, checkpoint, signal_name):
    """The run folder's record that the run stopped for a preemption after saving `checkpoint` (`output_dir` None:
    not this process's to write), and the same record for `python -m mrl.train.supervise`, when this machine's processes
    were started under it (each machine of a multi-node run has its own supervisor)."""
    record = json.dumps({"step": step, "checkpoint": checkpoint, "signal": signal_name,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    for path in (output_dir and os.path.join(output_dir, PREEMPTED_MARKER), os.environ.get(PREEMPTED_NOTICE_ENV)):
        if path:
            with open(path, "w") as f:
                f.write(record)


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
