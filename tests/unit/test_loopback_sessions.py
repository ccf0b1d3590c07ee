"""Inference sessions, failover, verification and refusals over the loopback transport: the client's and the
server's real code on a tiny model, in milliseconds. What only real processes show (kills of a process,
the DHT, the CLI) stays in tests/integration."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2

from swarmllm import wire
from swarmllm.client import loop, remote_sequential
from swarmllm.client.failover import SessionFailedError
from swarmllm.client.inference_session import InferenceSession
from swarmllm.client.remote_sequential import RemoteSequential
from swarmllm.client.routing import MissingBlocksError
from swarmllm.client.verification import VerificationError
from swarmllm.loopback import LoopbackNetwork
from swarmllm.models.span import span_from_model
from swarmllm.protocol import (
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_PUSH,
    ErrorCode,
    OpenSession,
    PeerIdStr,
    Report,
    SessionId,
    SessionOpened,
    Step,
    StepDone,
)
from swarmllm.server.limits import Limits, PeerLimits, RateLimited
from swarmllm.trust.identity import Identity
from tests.unit.loopback_swarm import BLOCKS, HIDDEN, MODEL, LoopbackSwarm, steps


@pytest.fixture
def make_swarm():
    made: list[LoopbackSwarm] = []

    def make(spans, **options) -> LoopbackSwarm:
        made.append(LoopbackSwarm(spans, **options))
        return made[-1]

    yield make
    for swarm in made:
        swarm.close()


def run(session: InferenceSession, inputs: list[torch.Tensor], between=None) -> list[torch.Tensor]:
    """The session's outputs for these steps; `between(i)` runs before step i (to inject a fault)."""
    outs = []
    for i, hidden in enumerate(inputs):
        if between is not None:
            between(i)
        outs.append(session.step(hidden))
    return outs


def assert_outputs(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_a_session_over_two_servers_equals_local_blocks(make_swarm):
    swarm = make_swarm([(0, 2), (2, BLOCKS)])
    inputs = steps(5, 1, 1, 3)
    with InferenceSession(swarm.client(), 0, BLOCKS, max_length=16) as session:
        outs = run(session, inputs)
        assert [hop.peer_id for hop in session.route] == swarm.peers
        assert session.position == 10
    assert_outputs(outs, swarm.local_steps(inputs))
    # Closed: every server freed the session's cache.
    assert all(h.context.memory.used == 0 for h in swarm.handlers.values())


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_a_failed_server_is_replaced_mid_session_and_its_history_replayed(make_swarm, fault):
    """A crashed server (its stream ends) or a hung one (no reply within request_timeout), after 2 steps."""
    swarm = make_swarm([(0, 2), (0, 2), (2, BLOCKS)])
    manager = swarm.client(request_timeout=0.5)
    inputs = steps(4, 1, 1, 1)
    failed: list[str] = []

    def fail_first_hop(i: int) -> None:
        if i == 2:
            failed.append(session.route[0].peer_id)
            (swarm.network.kill if fault == "kill" else swarm.network.stall)(failed[0])

    with InferenceSession(manager, 0, BLOCKS, max_length=16) as session:
        outs = run(session, inputs, fail_first_hop)
        [replacement] = [p for p in swarm.peers[:2] if p not in failed]
        assert session.route[0].peer_id == replacement
    assert failed[0] in manager.banned()
    assert_outputs(outs, swarm.local_steps(inputs))
    # The replacement got one session, opened after the failure: it rebuilt the cache from the history.
    opened = [callee for _, callee, rpc in swarm.network.calls if rpc == RPC_INFERENCE]
    assert opened.count(replacement) == 1
    swarm.network.resume(failed[0])


def measured(manager, rtts: dict[str, float]) -> None:
    """Let the client's first pings land, then set what they measured: routes and checkers follow rtts."""
    manager.servers()
    wait_for(lambda: len(manager.rtts) == len(rtts))
    manager.rtts.update(rtts)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.005)


@pytest.mark.parametrize("role", ["primary", "checker"])
def test_a_lying_server_is_caught_reported_and_replaced(make_swarm, role):
    swarm = make_swarm([(0, BLOCKS), (0, BLOCKS), (0, BLOCKS)])
    honest, liar, referee = swarm.peers
    swarm.handlers[liar].context.faults.corrupt = 1.0
    manager = swarm.client(verify=1.0)
    # The nearest server is the primary, the next its checker, the last the referee.
    measured(manager, {liar: 0.001, honest: 0.002, referee: 0.003} if role == "primary"
             else {honest: 0.001, liar: 0.002, referee: 0.003})
    inputs = steps(4, 1, 1)
    with InferenceSession(manager, 0, BLOCKS, max_length=8) as session:
        outs = run(session, inputs)
        assert liar not in {hop.peer_id for hop in session.route}
    # Two honest servers outvoted it on the first step: it is reported once, avoided, and never answered.
    assert [(r.reporter, r.offender) for r in swarm.network.reports(MODEL)] == [(manager.peer_id, liar)]
    assert liar in manager.banned()
    assert_outputs(outs, swarm.local_steps(inputs))


@pytest.mark.parametrize("call", ["session", "forward"])
def test_two_servers_that_disagree_with_no_third_refuse_to_answer(make_swarm, call):
    swarm = make_swarm([(0, BLOCKS), (0, BLOCKS)])
    swarm.handlers[swarm.peers[1]].context.faults.corrupt = 1.0
    manager = swarm.client(verify=1.0)
    x = steps(3)[0]
    if call == "session":
        session = InferenceSession(manager, 0, BLOCKS, max_length=8)
        with pytest.raises(VerificationError, match="no third holds them"):
            session.step(x)
        assert session.closed  # some servers took the step and no honest answer came back
    else:
        with torch.no_grad(), pytest.raises(VerificationError, match="no third holds them"):
            RemoteSequential(manager)(x)
    assert swarm.network.reports(MODEL) == []  # nobody is blamed without a majority


def test_a_caller_error_is_raised_at_once_and_bans_nobody(make_swarm):
    swarm = make_swarm([(0, BLOCKS), (0, BLOCKS)])
    manager = swarm.client()
    with InferenceSession(manager, 0, BLOCKS, max_length=8) as session:
        session.step(steps(2)[0])
        with pytest.raises(wire.RemoteError) as refused:
            session.step(torch.randn(1, 1, 16))  # the wrong hidden size: no server would take it
    assert refused.value.code in {ErrorCode.BAD_REQUEST}
    assert manager.banned() == frozenset()
    opened = [callee for _, callee, rpc in swarm.network.calls if rpc == RPC_INFERENCE]
    assert len(opened) == 1  # not retried on the other server


def test_a_server_over_its_session_limit_is_skipped_not_banned(make_swarm):
    swarm = make_swarm([(0, BLOCKS)])
    strict = swarm.add_server(0, BLOCKS, limits=PeerLimits(Limits(max_sessions=1)))
    manager = swarm.client(allowed_servers=[strict])
    with InferenceSession(manager, 0, BLOCKS, max_length=8) as first:
        first.step(steps(1)[0])
        with pytest.raises(SessionFailedError, match="no server can hold this session"):
            InferenceSession(manager, 0, BLOCKS, max_length=8).step(steps(1)[0])
    assert strict not in manager.banned()


def test_missing_blocks_are_named(make_swarm):
    swarm = make_swarm([(0, 2)])
    with pytest.raises(MissingBlocksError, match="2"):
        InferenceSession(swarm.client(), 0, BLOCKS, max_length=8).step(steps(1)[0])


def test_a_server_between_spans_refuses_and_the_session_goes_elsewhere(make_swarm):
    swarm = make_swarm([(0, BLOCKS), (0, BLOCKS)])
    moving, other = swarm.peers
    swarm.handlers[moving].context.spans.set_span(None)  # a server moving to other blocks, meanwhile
    manager = swarm.client()
    measured(manager, {moving: 0.001, other: 0.002})  # the moving one looks best
    inputs = steps(3, 1)
    with InferenceSession(manager, 0, BLOCKS, max_length=8) as session:
        outs = run(session, inputs)
        assert [hop.peer_id for hop in session.route] == [other]
    assert_outputs(outs, swarm.local_steps(inputs))


# --- stateless forward and backward (training) ---


def local_forward(swarm: LoopbackSwarm, hidden: torch.Tensor) -> torch.Tensor:
    span = span_from_model(swarm.model, 0, BLOCKS)
    return span(hidden, torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1))


def test_forward_and_backward_over_two_servers_equal_local_gradients(make_swarm):
    swarm = make_swarm([(0, 2), (2, BLOCKS)])
    remote = RemoteSequential(swarm.client())
    x = steps(5, batch=2)[0].requires_grad_(True)
    remote(x).square().sum().backward()
    x_local = x.detach().clone().requires_grad_(True)
    local_forward(swarm, x_local).square().sum().backward()
    torch.testing.assert_close(x.grad, x_local.grad, rtol=1e-4, atol=1e-5)


def test_a_forward_on_a_killed_server_is_retried_on_another(make_swarm):
    swarm = make_swarm([(0, BLOCKS), (0, BLOCKS)])
    dead, alive = swarm.peers
    swarm.speeds[dead] = 1e12  # stateless calls pick holders by throughput: the dead one first
    manager = swarm.client()
    swarm.network.kill(dead)
    x = steps(4)[0]
    with torch.no_grad():
        torch.testing.assert_close(RemoteSequential(manager)(x), local_forward(swarm, x), rtol=1e-4, atol=1e-5)
    assert [callee for _, callee, rpc in swarm.network.calls if rpc == RPC_FORWARD] == [dead, alive]
    assert dead in manager.banned()


@pytest.mark.parametrize("role", ["primary", "checker"])
def test_a_lying_server_is_outvoted_on_a_forward(make_swarm, role):
    swarm = make_swarm([(0, BLOCKS), (0, BLOCKS), (0, BLOCKS)])
    honest, liar, referee = swarm.peers
    swarm.handlers[liar].context.faults.corrupt = 1.0
    # The primary is picked by throughput, its checkers nearest first.
    swarm.speeds[liar if role == "primary" else honest] = 1e12
    manager = swarm.client(verify=1.0)
    measured(manager, {liar: 0.001, honest: 0.002, referee: 0.003} if role == "checker"
             else {honest: 0.001, referee: 0.002, liar: 0.003})
    x = steps(4)[0]
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(RemoteSequential(manager)(x), local_forward(swarm, x), rtol=1e-4, atol=1e-5)
    # The first forward: the liar and an honest server disagree, the third sides with the honest one. The
    # second runs on the two honest servers only.
    forwards = [callee for _, callee, rpc in swarm.network.calls if rpc == RPC_FORWARD]
    assert forwards[:3] == ([liar, honest, referee] if role == "primary" else [honest, liar, referee])
    assert liar not in forwards[3:]
    assert [(r.reporter, r.offender) for r in swarm.network.reports(MODEL)] == [(manager.peer_id, liar)]


@pytest.mark.parametrize("call", ["session", "forward"])
def test_a_dead_checker_is_replaced_by_the_next_holder_not_skipped(make_swarm, call):
    """The nearest checker of the liar is dead: the client avoids it and checks on the next holder (a third
    settles the mismatch), instead of returning the liar's output unchecked."""
    swarm = make_swarm([(0, BLOCKS)] * 4)
    liar, dead, honest, referee = swarm.peers
    swarm.handlers[liar].context.faults.corrupt = 1.0
    swarm.speeds[liar] = 1e12
    manager = swarm.client(verify=1.0)
    measured(manager, {liar: 0.001, dead: 0.002, honest: 0.003, referee: 0.004})
    swarm.network.kill(dead)
    inputs = steps(4, 1)
    if call == "session":
        with InferenceSession(manager, 0, BLOCKS, max_length=8) as session:
            assert_outputs(run(session, inputs), swarm.local_steps(inputs))
    else:
        with torch.no_grad():
            torch.testing.assert_close(RemoteSequential(manager)(inputs[0]), local_forward(swarm, inputs[0]),
                                       rtol=1e-4, atol=1e-5)
    assert {liar, dead} <= manager.banned()
    assert [(r.reporter, r.offender) for r in swarm.network.reports(MODEL)] == [(manager.peer_id, liar)]


def test_a_rewind_drops_the_servers_tokens_after_it(make_swarm):
    swarm = make_swarm([(0, 2), (2, BLOCKS)])
    first, dropped, replacement = steps(4, 2, 1)
    with InferenceSession(swarm.client(), 0, BLOCKS, max_length=16) as session:
        session.step(first)
        session.step(dropped)
        session.rewind(4)  # e.g. rejected draft tokens
        out = session.step(replacement)
        assert session.position == 5
    assert_outputs([out], swarm.local_steps([first, replacement])[1:])


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_a_server_that_fails_after_a_rewind_is_replaced_with_only_the_accepted_tokens(make_swarm, fault):
    """Speculative decoding's pattern: draft tokens sent, some rejected (rewind), then the first hop fails.
    The replacement gets the history the session still holds (the first 4 tokens, not the 2 rejected), so
    the next step is at position 4 and equals local blocks that never saw the rejected ones."""
    swarm = make_swarm([(0, 2), (0, 2), (2, BLOCKS)])
    manager = swarm.client(request_timeout=0.5)
    first, rejected, accepted = steps(4, 2, 1)
    with InferenceSession(manager, 0, BLOCKS, max_length=16) as session:
        session.step(first)
        session.step(rejected)
        session.rewind(4)
        failed = session.route[0].peer_id
        (swarm.network.kill if fault == "kill" else swarm.network.stall)(failed)
        out = session.step(accepted)
        assert session.position == 5 and session.route[0].peer_id != failed
    assert_outputs([out], swarm.local_steps([first, accepted])[1:])
    swarm.network.resume(failed)


# --- server-to-server push ---


def pushed_counts(caplog) -> list[tuple[int, int]]:
    """(steps, steps pushed first) of each server's session closed so far, from the servers' logs."""
    found = [re.search(r"session (\w+) closed after (\d+) steps, (\d+) of them pushed", r.getMessage())
             for r in caplog.records]
    return [(int(m[2]), int(m[3])) for m in found if m]


@pytest.mark.parametrize("push", [True, False])
def test_push_sends_steps_to_the_next_server_and_keeps_outputs_exact(make_swarm, caplog, push):
    swarm = make_swarm([(0, 1), (1, 3), (3, BLOCKS)])
    manager = swarm.client(push=push, push_min_rtt=0.0)
    inputs = steps(3, *[1] * 7)
    caplog.set_level(logging.INFO, logger="swarmllm.server.sessions")
    with InferenceSession(manager, 0, BLOCKS, max_length=16) as session:
        outs = run(session, inputs)
        route = [hop.peer_id for hop in session.route]
    assert_outputs(outs, swarm.local_steps(inputs))
    wait_for(lambda: len(pushed_counts(caplog)) == 3)  # each server logs its session's end as it sees it
    closed = pushed_counts(caplog)
    assert all(steps == 8 for steps, _ in closed)
    pushes = [callee for _, callee, rpc in swarm.network.calls if rpc == RPC_PUSH]
    if push:  # every step of the second and third server was pushed to it; some arrived before the client's
        assert sorted(pushes) == sorted(route[1:] * 8)
        assert sum(pushed for _, pushed in closed) > 0
    else:
        assert pushes == [] and all(pushed == 0 for _, pushed in closed)


def test_push_is_skipped_where_servers_are_too_close_for_it_to_pay(make_swarm):
    swarm = make_swarm([(0, 2), (2, BLOCKS)])
    manager = swarm.client()  # push on, with the default push_min_rtt
    with InferenceSession(manager, 0, BLOCKS, max_length=8) as session:
        session.step(steps(2)[0])
        measured(manager, dict.fromkeys(swarm.peers, 0.001))  # loopback-like
        assert not session._push_pays()
        manager.rtts.update(dict.fromkeys(swarm.peers, 0.04))  # another city
        assert session._push_pays()


class ReadsRecorded:
    """The network's directory, recording the thread of each read of the server list."""

    def __init__(self, network):
        self.network, self.threads = network, []

    def servers(self, model):
        self.threads.append(threading.current_thread())
        return self.network.servers(model)

    def __getattr__(self, name):
        return getattr(self.network, name)


def test_the_server_list_is_never_read_on_the_io_loop(make_swarm):
    """A directory read (a DHT lookup) on the shared I/O loop would stall every session on it: opening
    checkers and replacements, and each stream's extras, use the list the route was made from."""
    swarm = make_swarm([(0, BLOCKS)] * 3)
    directory = ReadsRecorded(swarm.network)
    manager = swarm.client(directory, verify=1.0)
    inputs = steps(3, 1, 1)
    with InferenceSession(manager, 0, BLOCKS, max_length=8) as session:
        outs = run(session, inputs, lambda i: i == 1 and swarm.network.kill(session.route[0].peer_id))
    assert_outputs(outs, swarm.local_steps(inputs))
    assert directory.threads and all(t.name != "swarmllm-io" for t in directory.threads)  # (client/loop.py)


# --- the server's side of a session, message by message ---


@pytest.mark.parametrize("fault", ["wrong width", "1-D input", "too many push targets"])
def test_a_refused_step_leaves_the_session_as_it_was_its_rewind_included(make_swarm, fault):
    swarm = make_swarm([(0, BLOCKS)])
    transport = swarm.network.transport(Identity.ephemeral())

    async def scenario() -> list:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (msg := await outbox.get()) is not None:
                yield msg

        def send(record, *tensors):
            outbox.put_nowait(wire.request(record, *tensors))

        def step(step_id: int, q: int, past: int, keep: int | None = None, width: int = HIDDEN, push_to=(),
                 shape: tuple[int, ...] | None = None):
            send(Step(step_id=step_id, keep=keep, push_to=push_to), torch.randn(*(shape or (1, q, width))),
                 torch.arange(past, past + q)[None])

        replies = await transport.open_stream(swarm.peers[0], RPC_INFERENCE, requests())
        send(OpenSession(session_id=SessionId("s1"), start=0, end=BLOCKS, batch_size=1, max_length=16))
        wire.parse(await anext(replies), SessionOpened)
        lengths: list = []
        step(0, 4, 0)
        lengths.append(wire.parse(await anext(replies), StepDone)[0].length)
        # A rewind to 2 in a step that is refused as a whole:
        if fault == "wrong width":
            step(1, 1, 2, keep=2, width=HIDDEN // 2)
        elif fault == "1-D input":
            step(1, 1, 2, keep=2, shape=(HIDDEN,))
        else:  # a route has fewer hops than the model has blocks
            step(1, 1, 2, keep=2, push_to=tuple(swarm.peers * BLOCKS))
        try:
            wire.parse(await anext(replies), StepDone)
        except wire.RemoteError as e:
            lengths.append(e.code)
        step(2, 1, 4)  # continues after all 4 tokens: the rewind never happened
        lengths.append(wire.parse(await anext(replies), StepDone)[0].length)
        outbox.put_nowait(None)
        await replies.aclose()
        return lengths

    assert loop.run(scenario(), timeout=30) == [4, ErrorCode.BAD_REQUEST, 5]


def test_a_forward_the_servers_refuse_as_malformed_is_not_retried(make_swarm):
    swarm = make_swarm([(0, BLOCKS), (0, BLOCKS)])
    manager = swarm.client()
    with torch.no_grad(), pytest.raises(wire.RemoteError) as refused:
        RemoteSequential(manager)(torch.randn(1, 3, HIDDEN // 2))
    assert refused.value.code == ErrorCode.BAD_REQUEST
    assert len([rpc for _, _, rpc in swarm.network.calls if rpc == RPC_FORWARD]) == 1
    assert manager.banned() == frozenset()


# --- a server's cache memory: budget, queue, idle sessions ---

TOKEN_BYTES = 2 * 2 * 8 * 4 * 2  # blocks 0:2 of the tiny model: 2 blocks x 2 kv heads x 8 dims x float32 x (k, v)


def small_server(swarm: LoopbackSwarm, queue_timeout: float = 5.0) -> str:
    """Blocks 0:2 with a budget of 200 tokens, in pages of 16: 12 whole pages (192 tokens; the pool trims the rest)."""
    return swarm.add_server(0, 2, cache_bytes=200 * TOKEN_BYTES, queue_timeout=queue_timeout, page_tokens=16)


def fill(manager, tokens: int = 190) -> InferenceSession:
    """A session holding all 12 of the small server's pages: no room for another one's first page."""
    session = InferenceSession(manager, 0, BLOCKS, max_length=192)
    session.step(torch.randn(1, tokens, HIDDEN))
    return session


def test_a_session_over_the_whole_budget_is_refused_with_what_is_available(make_swarm):
    swarm = make_swarm([(2, BLOCKS)])
    small_server(swarm)
    manager = swarm.client()
    with pytest.raises(SessionFailedError, match=r"needs up to 76.0 KiB .* whole budget is 48.0 KiB"):
        InferenceSession(manager, 0, BLOCKS, max_length=300).step(steps(4)[0])
    assert manager.banned() == frozenset(), "a full server is healthy: it must not be banned"


def test_a_queued_session_proceeds_once_memory_frees(make_swarm):
    swarm = make_swarm([(2, BLOCKS)])
    memory = swarm.handlers[small_server(swarm)].context.memory
    manager = swarm.client()
    filler = fill(manager)
    inputs = steps(4, 1)
    result: dict = {}

    def second() -> None:
        try:
            with InferenceSession(manager, 0, BLOCKS, max_length=8) as session:
                result["outs"] = run(session, inputs)
        except Exception as e:
            result["error"] = e

    thread = threading.Thread(target=second)
    thread.start()
    wait_for(lambda: len(memory._waiters) == 1)  # the server queued it (it waits for its first page)
    assert "outs" not in result
    filler.close()
    thread.join(30)
    assert "error" not in result, result
    assert_outputs(result["outs"], swarm.local_steps(inputs))


def test_a_session_outgrowing_free_memory_fails_clearly_and_the_server_is_not_banned(make_swarm):
    """Admitted sessions grow on demand. One that needs pages nobody frees in time gets cache_full; the client
    tries another route (the same server: full servers are not banned) and gives up after max_failovers with
    the server's message. Once memory is free, the same session fits."""
    swarm = make_swarm([(2, BLOCKS)])
    small_server(swarm, queue_timeout=0.2)
    manager = swarm.client(max_failovers=1)
    filler = fill(manager, 100)  # 7 of 12 pages
    session = InferenceSession(manager, 0, BLOCKS, max_length=192)
    session.step(torch.randn(1, 50, HIDDEN))  # 4 more pages
    with pytest.raises(SessionFailedError, match=r"no server had room for this step.*waited 0.2s in the queue"):
        session.step(torch.randn(1, 60, HIDDEN))  # needs 3 more pages, 1 is free
    assert manager.banned() == frozenset(), "a full server is healthy: it must not be banned"
    filler.close()
    session.close()
    with InferenceSession(manager, 0, BLOCKS, max_length=192) as fresh:  # the memory came back
        fresh.step(torch.randn(1, 110, HIDDEN))


def test_an_idle_session_times_out_frees_its_cache_and_is_rebuilt_on_its_next_step(make_swarm):
    swarm = make_swarm([(2, BLOCKS)], session_timeout=0.5)
    memory = swarm.handlers[small_server(swarm, queue_timeout=0.2)].context.memory
    manager = swarm.client()
    first, second = steps(3, 1)
    session = InferenceSession(manager, 0, BLOCKS, max_length=192)
    session.step(first)
    wait_for(lambda: memory.used == 0)  # idle past session_timeout: the server freed its cache
    resumed = session.step(second)  # the server timed it out: it is reopened and its history replayed
    session.close()
    assert manager.banned() == frozenset(), "a server that timed out an idle session is healthy"
    assert_outputs([resumed], swarm.local_steps([first, second])[1:])


def test_the_loopback_refuses_what_it_cannot_honour_and_expires_reports():
    network = LoopbackNetwork()
    host = network.host()
    with pytest.raises(NotImplementedError, match="balanced"):
        asyncio.run(host.add_protobuf_handler("x", lambda r, c: r, runtime_pb2.ExpertRequest, balanced=True))
    with pytest.raises(NotImplementedError, match="ExpertResponse"):
        asyncio.run(host.add_protobuf_handler("x", lambda r, c: r, runtime_pb2.ExpertResponse))
    report = Report(reporter=PeerIdStr("a"), offender=PeerIdStr("b"), start=0, end=1, error=1.0, tolerance=0.1, at=0.0)
    network.publish_report(MODEL, report, ttl=0.0)  # expired at once, as in the DHT
    network.publish_report("other", report, ttl=60.0)
    assert network.reports(MODEL) == [] and network.reports("other") == [report]


def test_a_session_cancelled_as_a_step_arrives_ends_and_frees_its_cache(make_swarm):
    """The transport cancels a session whose client's stream closed. A step that lands in its inbox in the same
    moment (a push from the previous server) must not swallow that cancellation: the session would run on,
    holding its cache, until it timed out (Python 3.11's wait_for returned the step and dropped the cancel)."""
    swarm = make_swarm([(0, BLOCKS)])
    peer = swarm.peers[0]
    sessions, memory = swarm.handlers[peer].sessions, swarm.handlers[peer].context.memory
    caller = PeerID.from_base58(Identity.ephemeral().peer_id)
    context = P2PContext(handle_name=RPC_INFERENCE, local_id=PeerID.from_base58(peer), remote_id=caller)
    opening = wire.request(OpenSession(session_id=SessionId("cancelled"), start=0, end=BLOCKS, batch_size=1,
                                       max_length=8))

    async def scenario():
        async def requests():
            yield opening
            await asyncio.Event().wait()  # the client sends nothing more; its stream is about to close

        replies = sessions.rpc_inference(requests(), context)
        wire.parse(await anext(replies), SessionOpened)
        waiting = asyncio.ensure_future(anext(replies))
        while ("cancelled", 0) not in sessions.inboxes or not sessions.inboxes[("cancelled", 0)]._getters:
            await asyncio.sleep(0)  # until the session waits on its inbox
        sessions.inboxes[("cancelled", 0)].put_nowait(RateLimited("a step that arrives as the stream closes"))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return sessions.active, memory.used

    assert loop.run(scenario(), timeout=30) == (0, 0)


def test_a_forward_refused_by_a_rate_limit_goes_to_another_holder_and_bans_nobody(make_swarm):
    swarm = make_swarm([(0, BLOCKS)])
    other = swarm.peers[0]
    # One request, then none: its clock stands still, so its bucket (burst 1) never refills.
    strict = swarm.add_server(0, BLOCKS, limits=PeerLimits(Limits(rate=1.0, burst=1), clock=lambda: 0.0))
    swarm.speeds[strict] = 1e12  # stateless calls pick holders by throughput: the strict one first
    manager = swarm.client()
    remote, xs = RemoteSequential(manager), steps(3, 3, 3)
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(remote(x), local_forward(swarm, x), rtol=1e-4, atol=1e-5)
    # The first call used its one request; each later one was refused there, then served by the other.
    assert [callee for _, callee, rpc in swarm.network.calls if rpc == RPC_FORWARD] == [strict, strict, other,
                                                                                        strict, other]
    assert manager.banned() == frozenset(), "a server that limits us is healthy"


def test_a_forward_refused_by_every_holder_waits_for_a_bucket_to_refill(make_swarm, monkeypatch):
    swarm = make_swarm([])
    now = [0.0]
    strict = swarm.add_server(0, BLOCKS, limits=PeerLimits(Limits(rate=10.0, burst=1), clock=lambda: now[0]))
    waits = []

    def sleep(seconds: float) -> None:  # the client's wait passes on the server's clock, not the test's
        waits.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(remote_sequential, "time", SimpleNamespace(sleep=sleep))
    manager = swarm.client()
    remote, xs = RemoteSequential(manager), steps(3, 3, 3)
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(remote(x), local_forward(swarm, x), rtol=1e-4, atol=1e-5)
    # Each call after the first is refused once, then served after the client's wait refilled the bucket.
    calls = [callee for _, callee, rpc in swarm.network.calls if rpc == RPC_FORWARD]
    assert calls == [strict] * 5 and waits == [0.2] * 2, (calls, waits)
    assert manager.banned() == frozenset()
