"""The zygote forks `swarmllm` children that behave as fresh `python -m swarmllm.cli.main` processes would:
their exit codes, their separate stdout and stderr, signals, and a session of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from swarmllm.launcher import run, spawn


def test_exit_codes_and_separate_outputs() -> None:
    done = run(["--help"])
    assert done.returncode == 0 and done.stdout.startswith("usage: swarmllm") and done.stderr == ""
    done = run(["serve"])  # argparse: the model is missing
    assert done.returncode == 2 and done.stdout == ""
    assert "usage: swarmllm serve" in done.stderr and "the following arguments are required: model" in done.stderr


def test_an_error_is_one_line_and_exit_code_1(tmp_path) -> None:
    done = run(["serve", str(tmp_path / "no-such-model"), "--blocks", "0:1"])
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_child_runs_in_its_own_session_and_reports_the_signal_that_killed_it() -> None:
    child = spawn("dht", ["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
    try:
        child.wait_for("initial peers:", 120)
        assert os.getpgid(child.proc.pid) == child.proc.pid != os.getpgid(0)
        assert child.proc.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            child.proc.wait(0.1)
        child.proc.send_signal(signal.SIGKILL)
        assert child.proc.wait(30) == -signal.SIGKILL
    finally:
        child.stop()


def test_sigterm_stops_a_child_cleanly() -> None:
    child = spawn("dht", ["dht", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
    try:
        child.wait_for("initial peers:", 120)
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(30) == 0
    finally:
        child.stop()


@pytest.mark.parametrize("held", ["SharedBytes", "MPFuture", "executor"])
def test_a_lock_left_held_by_a_killed_child_does_not_block_the_next(held) -> None:
    """hivemind's process-shared locks, inherited from the zygote, are each child's own: one held for good by
    a child killed inside it (here: held by this process when it forks, as the zygote's would be) must not
    block the next child's DHT, which takes all three. Before, later children hung in `DHT.__init__`."""
    from hivemind.utils.asyncio import _AsyncContextWrapper
    from hivemind.utils.mpfuture import MPFuture, SharedBytes

    from swarmllm.zygote import _own_hivemind_locks

    lock = {"SharedBytes": SharedBytes._lock, "MPFuture": MPFuture._initialization_lock,
            "executor": _AsyncContextWrapper.EXECUTOR_LOCK}[held]
    lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: what a DHT's start takes, after the zygote's reset
            code = 1
            try:
                _own_hivemind_locks()
                MPFuture()
                _AsyncContextWrapper.get_process_wide_executor()
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child blocked on hivemind's {held} lock")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        lock.release()
