"""python -m mrl.train.supervise on its own, around small shell commands: what it waits for, what it passes on, the status
it leaves with. (tests/test_guards.py runs it around the real launchers and training scripts.)"""

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, session_processes

from mrl.utils.script import PREEMPTED_EXIT_CODE


def supervise(script, linger=60, stderr=subprocess.DEVNULL):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MRL_SUPERVISE_LINGER_SECONDS=str(linger))
    return subprocess.Popen([sys.executable, "-m", "mrl.train.supervise", "bash", "-c", script], env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def test_the_command_status_passes_through_and_a_preemption_notice_turns_it_into_75(tmp_path):
    assert supervise("exit 3").wait(timeout=30) == 3
    killed = supervise("kill -KILL $$")
    assert killed.wait(timeout=30) == 128 + signal.SIGKILL  # as a shell reports a signal
    # a launcher reports 1 for a training process that exited 75: the notice the training process wrote wins
    assert supervise('echo \'{"step": 3}\' > "$MRL_PREEMPTED_NOTICE"; exit 1').wait(timeout=30) == PREEMPTED_EXIT_CODE
    result = subprocess.run([sys.executable, "-m", "mrl.train.supervise", "no-such-launcher"], env=dict(
        os.environ, PYTHONPATH=str(ROOT)), text=True, capture_output=True)
    assert result.returncode == 127 and result.stderr == "error: no-such-launcher: command not found\n"


def test_a_signal_reaches_the_command_once_and_adopted_orphans_are_waited_for(tmp_path):
    # The "launcher" dies of SIGTERM at once; its "training process", in the background, takes 2 s to save after
    # the signal, like an orphaned trainer. Sent to mrl.train.supervise alone, the signal reaches both, once each, and
    # mrl.train.supervise exits only after the orphan has written its file.
    saved, counted = tmp_path / "saved", tmp_path / "signals"
    trainer = f"trap 'echo TERM >> {counted}; sleep 2; echo done > {saved}; exit 0' TERM; while :; do sleep 0.1; done"
    process = supervise(f"bash -c \"{trainer}\" & sleep 30")
    time.sleep(1.0)
    started = time.time()
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM  # the launcher's own end
    assert time.time() - started > 1.5 and saved.read_text() == "done\n"
    assert counted.read_text() == "TERM\n"


def test_a_finished_command_does_not_wait_forever_for_what_it_left_running(tmp_path):
    with open(tmp_path / "stderr", "w") as stderr:  # not a pipe: the sleep left behind would hold it open
        process = supervise("sleep 60 & exit 0", linger=1, stderr=stderr)
    started = time.time()
    assert process.wait(timeout=30) == 0 and time.time() - started < 10
    assert "still running after 1 s" in (tmp_path / "stderr").read_text()
    left = session_processes(process.pid)  # the sleep it left
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left
