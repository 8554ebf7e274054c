"""How every script and `python -m` command of mrl starts and ends: its --help, a UserError as one line (never a
traceback), the exit status of a run stopped by preemption after its checkpoint, and which signals mean preemption
(so that DataLoader workers leave them to the training process).

Light on purpose (no torch): `python -m mrl.train.supervise` imports it, and starts in a moment.
"""

import argparse
import difflib
import os
import re
import signal
import sys

from mrl import UserError

# Exit status of a run stopped by a preemption signal after saving its checkpoint: EX_TEMPFAIL, "try again later".
# The training scripts exit with it (mrl.train.guards); a job script can requeue on it (see examples/slurm.sh).
PREEMPTED_EXIT_CODE = 75
# What Slurm, Kubernetes, `timeout` and `docker stop` send some time before killing a job (SIGTERM, SIGUSR1), and
# Ctrl-C: each asks a training run to save a checkpoint and stop (mrl.train.guards.Preemption).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Raised after the checkpoint is saved; `run` turns it into a message and PREEMPTED_EXIT_CODE."""


def ignore_signals_in_worker(worker_id=None):
    """DataLoader worker_init_fn: leave the preemption signals to the training process. (PyTorch's workers die on
    a SIGTERM that does not come from their parent, which made a signal to the process group fail the run with
    "DataLoader worker is killed by signal" before the training process could save.)"""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default, except where the help text already says what it is or there is none."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser (with HelpFormatter) whose errors are one line, not argparse's usage block and then the
    error: what is wrong, the closest valid value for a misspelled choice or flag, and where every flag is listed."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}{self.suggestion(message)} (`{self.prog} --help` lists every "
                     "flag)\n")

    def suggestion(self, message):
        """'; did you mean X?' for an invalid choice or an unknown flag close to a valid one."""
        choice = re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)", message)
        if choice:
            wrong, valid = choice.group(1), [c.strip(" '\"") for c in choice.group(2).split(",")]
        else:
            unknown = re.search(r"unrecognized arguments: (\S+)", message)
            if not unknown:
                return ""
            wrong, valid = unknown.group(1).split("=")[0], [o for o in self._option_string_actions if o.startswith("--")]
        close = difflib.get_close_matches(wrong, valid, n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


def run(main, args):
    """Call main(args); a UserError becomes one line on stderr and exit status 1, not a traceback, a preempted run
    exits with PREEMPTED_EXIT_CODE after its checkpoint is saved, and a Ctrl-C before training starts (when the
    training scripts begin to handle it themselves) exits with 130, also without a traceback."""
    try:
        main(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
            print(f"\npreempted: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
