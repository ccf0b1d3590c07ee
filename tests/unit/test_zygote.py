"""The zygote forks `swarmllm` children that behave as fresh `python -m swarmllm.cli.main` processes would:
their exit codes, their separate stdout and stderr, signals, and a session of their own."""

from __future__ import annotations

import os
import signal
import subprocess

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
