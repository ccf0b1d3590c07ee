"""Which of swarmllm's files one decode step of `generate` runs code in, on the client and on the servers.

Not a benchmark: the count behind docs/architecture.md's "path of one inference step", traced instead of
read. A tiny random Llama is served by two servers of 2 blocks each, joined by the in-process loopback
transport (`swarmllm.loopback`) instead of hivemind, so that one process can watch every thread: the caller's,
the client's I/O loop (where the servers' handlers also run here) and each server's compute thread. The
third token of a greedy `generate` is traced, with the servers pushing it along the route as they do when
they are far apart (`push_min_rtt=0`).

A frame belongs to the client or to a server by the nearest `client/` or `server/` frame it was called from
(a shared module such as wire.py counts on both sides). On hivemind, `client/transport.py` and hivemind's
own code take the place of `loopback.py`.

    .venv/bin/python bench/step_path.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for the tests' loopback swarm
from tests.unit.loopback_swarm import LoopbackSwarm  # noqa: E402

import swarmllm  # noqa: E402
from swarmllm import AutoDistributedModelForCausalLM  # noqa: E402
from swarmllm.client import loop  # noqa: E402
from swarmllm.client.sequence_manager import SequenceManager  # noqa: E402

TRACED_TOKEN = 2  # the third new token: a plain decode step, after the prompt's and one more

PACKAGE = f"{Path(swarmllm.__file__).parent}/"  # frames in files under it are swarmllm's


class StepTracer:
    """A profiler installed in every thread that records only while `active`: file -> side -> functions."""

    def __init__(self) -> None:
        self.active = False
        self.files: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self._lock = threading.Lock()

    def __call__(self, frame, event, arg) -> None:
        if not self.active or event != "call" or PACKAGE not in frame.f_code.co_filename:
            return
        name = _short(frame.f_code.co_filename)
        with self._lock:
            self.files[name][_side(frame)].add(frame.f_code.co_name)


class _TraceOneStep(LogitsProcessor):
    """Turns the tracer on after token `TRACED_TOKEN - 1` is chosen and off after `TRACED_TOKEN` is: in
    between, exactly one forward of the distributed model runs."""

    def __init__(self, tracer: StepTracer) -> None:
        self.tracer, self.calls = tracer, 0

    def __call__(self, input_ids, scores):
        self.tracer.active = self.calls == TRACED_TOKEN - 1
        self.calls += 1
        return scores


def _short(filename: str) -> str:
    return filename.split(PACKAGE, 1)[1]


def _side(frame) -> str:
    """'client' or 'server': the nearest caller in either package; 'transport' for the loopback's own tasks."""
    while frame is not None:
        if PACKAGE in frame.f_code.co_filename:
            top = _short(frame.f_code.co_filename).split("/")[0]
            if top in ("client", "server"):
                return top
        frame = frame.f_back
    return "transport"


def main() -> None:
    swarm = LoopbackSwarm([(0, 2), (2, 4)])
    with tempfile.TemporaryDirectory() as parent:
        folder = Path(parent) / swarm.name  # the client names the model after its folder, as the swarm does
        swarm.model.save_pretrained(folder)
        tracer = StepTracer()
        sys.setprofile(tracer)
        loop.run(_set_profile(tracer))
        for handler in swarm.handlers.values():
            loop.run(handler.context.scheduler.run(sys.setprofile, tracer))
        with mock.patch.object(SequenceManager, "join", lambda config, name, n: swarm.join(config)):
            # Servers push each step to the next one as across a WAN (on one host, pings decide whether to).
            model = AutoDistributedModelForCausalLM.from_pretrained(folder, push_min_rtt=0.0)
        try:
            model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=TRACED_TOKEN + 1, do_sample=False,
                           logits_processor=LogitsProcessorList([_TraceOneStep(tracer)]))
        finally:
            sys.setprofile(None)
            swarm.close()
    _report(tracer.files)


async def _set_profile(tracer: StepTracer) -> None:
    sys.setprofile(tracer)  # on the client's I/O loop thread, where this coroutine runs


def _report(files: dict[str, dict[str, set[str]]]) -> None:
    for side in ("client", "server", "transport"):
        names = sorted(f for f, sides in files.items() if side in sides)
        print(f"{side}: {len(names)} files")
        for name in names:
            print(f"  {name:34} {', '.join(sorted(files[name][side]))}")


if __name__ == "__main__":
    main()
