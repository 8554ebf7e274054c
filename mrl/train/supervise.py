"""Run a launch command so that the process a container or a scheduler waits on is the last one to exit.

    python -m mrl.train.supervise accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_ssl.py ...
    python -m mrl.train.supervise torchrun --nproc_per_node 8 train_ssl.py ...

A container's main process, a Kubernetes pod, a Slurm job step and `timeout` each wait for one process and, once it
has exited, kill whatever is left (the PID namespace or the step's cgroup goes away). On a preemption signal the
training processes need a moment to finish their optimizer step and save a checkpoint, but the launchers do not wait
for them: `accelerate launch` (one process, or any run on the CPU) dies of SIGTERM at once, and torchrun -- which
passes SIGTERM on and waits -- dies of SIGUSR1, Slurm's usual early warning. Under this command instead:

- the launch command runs in a process group of its own, and every SIGTERM, SIGUSR1, SIGINT or SIGHUP this process
  receives is passed to that group once, whether it was sent to this process alone or to the group it belongs to;
  the training processes save at their next optimizer step (their DataLoader workers ignore the signal);
- this process is a child subreaper (Linux): a training process whose launcher has died is re-parented to it, and it
  exits only when every process it started, and every one of theirs, has ended;
- its exit status is 75 (EX_TEMPFAIL, "try again": what examples/slurm.sh requeues on) when the run stopped for a
  preemption after saving its checkpoint, whatever status the launcher turned that into; otherwise the launch
  command's own.

The training processes tell it about a preemption through the file named by MRL_PREEMPTED_NOTICE, which it sets for
them (mrl.train.guards.write_preempted_marker writes the run folder's PREEMPTED marker there too).

After a signal it waits as long as a process it adopted is alive (the environment's own grace period bounds that).
When the launch command ended by itself, whatever it left behind gets LINGER_SECONDS (MRL_SUPERVISE_LINGER_SECONDS,
default 60) to end too; then this process reports what is left and exits, so that a stray background process
cannot keep a finished job from ending.
"""

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time

# Light on purpose (no torch): it starts, and handles signals, in a moment.
from mrl.utils.script import PREEMPTED_EXIT_CODE

# Set here for the processes this starts: a file that mrl.train.guards.write_preempted_marker writes the marker to as well.
PREEMPTED_NOTICE_ENV = "MRL_PREEMPTED_NOTICE"
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
PR_SET_CHILD_SUBREAPER = 36
LINGER_SECONDS = float(os.environ.get("MRL_SUPERVISE_LINGER_SECONDS", 60))


def become_subreaper():
    """Adopt the orphaned descendants (Linux >= 3.4); returns whether that worked."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def supervise(command):
    """Run `command` (a list) as described above; returns the exit status to leave with."""
    adopted = become_subreaper()
    with tempfile.TemporaryDirectory(prefix="mrl-supervise-") as folder:
        notice = os.path.join(folder, "preempted")
        child = subprocess.Popen(command, env={**os.environ, PREEMPTED_NOTICE_ENV: notice}, process_group=0)
        signalled = []

        def forward(signum, frame):
            signalled.append(signum)
            try:
                os.killpg(child.pid, signum)  # the group outlives its leader while any member is left
            except ProcessLookupError:
                pass

        for signum in FORWARDED:
            signal.signal(signum, forward)
        status = wait_for_everyone(child.pid, signalled) if adopted else child.wait()
        if os.path.exists(notice):
            return PREEMPTED_EXIT_CODE
    return status


def wait_for_everyone(pid, signalled):
    """Reap children (the launch command and every orphan adopted meanwhile) until none is left, or, when the launch
    command has ended and no signal came (`signalled` is empty), until LINGER_SECONDS later; returns the exit status
    of `pid`, the launch command (128 + N when a signal N ended it, as a shell reports it)."""
    status, deadline = None, None
    while True:
        try:
            # retried after a signal handler ran (PEP 475); polled once only stragglers can be left
            reaped, raw = os.waitpid(-1, os.WNOHANG if deadline else 0)
        except ChildProcessError:
            return status
        if reaped == pid:
            status = os.waitstatus_to_exitcode(raw)
            status = 128 - status if status < 0 else status
            deadline = time.monotonic() + LINGER_SECONDS
        elif reaped == 0:  # stragglers are still running
            if signalled:
                deadline = None  # a preemption: wait for them as long as they run
            elif time.monotonic() > deadline:
                print(f"mrl.train.supervise: the launch command ended (status {status}), but processes it started are "
                      f"still running after {LINGER_SECONDS:.0f} s; leaving them", file=sys.stderr)
                return status
            else:
                time.sleep(0.2)


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    command = argv[1:] if argv[0] == "--" else argv
    try:
        return supervise(command)
    except FileNotFoundError:
        print(f"error: {command[0]}: command not found", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
