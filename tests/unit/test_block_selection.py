"""Block selection and rebalancing, simulated on swarms of hundreds of servers joining and leaving."""

from __future__ import annotations

import random

from swarmllm.protocol import ServerRecord
from swarmllm.server.block_selection import block_speeds, bottleneck, choose_span, coverage, should_move

N_BLOCKS = 40


def server(peer: str, start: int, end: int, step_time: float = 0.01) -> ServerRecord:
    return ServerRecord(peer_id=peer, start=start, end=end, dtype="float32", cache_tokens_left=1, step_time=step_time)


def join(records: list[ServerRecord], peer: str, n: int, step_time: float) -> ServerRecord:
    start, end = choose_span(records, N_BLOCKS, n)
    r = server(peer, start, end, step_time)
    records.append(r)
    return r


def rebalance(records: list[ServerRecord], threshold: float, rounds: int, rng: random.Random) -> int:
    """Each round, every server (in random order) checks whether to move, seeing the moves before it."""
    moves = 0
    for _ in range(rounds):
        for i in rng.sample(range(len(records)), len(records)):
            target = should_move(records, records[i], N_BLOCKS, threshold)
            if target is not None:
                records[i] = records[i].model_copy(update={"start": target[0], "end": target[1]})
                moves += 1
    return moves


def test_a_faster_swarm_part_is_not_where_a_new_server_goes() -> None:
    records = [server("slow", 0, 20, step_time=0.05), server("fast", 20, 40, step_time=0.001)]
    assert choose_span(records, N_BLOCKS, 10)[1] <= 20


def test_joining_servers_cover_the_model_before_adding_redundancy() -> None:
    rng = random.Random(0)
    records: list[ServerRecord] = []
    for i in range(8):  # 8 x 5 blocks = exactly one copy of 40 blocks
        join(records, f"s{i}", 5, rng.uniform(0.005, 0.02))
    assert min(coverage(records, N_BLOCKS)) == 1


def test_hundreds_of_servers_joining_and_leaving_recover_coverage_and_bottleneck() -> None:
    rng = random.Random(1)
    records: list[ServerRecord] = []
    for i in range(300):
        join(records, f"s{i}", rng.randint(4, 12), rng.uniform(0.002, 0.03))
    healthy = bottleneck(records, N_BLOCKS)
    assert min(coverage(records, N_BLOCKS)) > 0 and healthy > 0

    # A region loses every server (a data centre goes down), plus random churn elsewhere.
    records = [r for r in records if not (r.start < 25 and r.end > 15)]
    records = [r for r in records if rng.random() > 0.2]
    assert min(coverage(records, N_BLOCKS)) == 0

    moves = rebalance(records, threshold=0.1, rounds=3, rng=rng)
    assert min(coverage(records, N_BLOCKS)) > 0, "rebalancing must close every gap"
    after = bottleneck(records, N_BLOCKS)
    speeds = block_speeds(records, N_BLOCKS)
    mean = sum(speeds) / len(speeds)
    # Capacity is spread evenly: the slowest block is close to the average one.
    assert after >= 0.5 * mean, (after, mean)
    assert 0 < moves < len(records)  # only some servers move

    # New servers join after the outage: they also go where the swarm is weakest.
    for i in range(100):
        join(records, f"n{i}", rng.randint(4, 12), rng.uniform(0.002, 0.03))
    assert bottleneck(records, N_BLOCKS) > after


def test_a_balanced_swarm_stays_put() -> None:
    rng = random.Random(2)
    records = [server(f"s{i}", (i % 4) * 10, (i % 4) * 10 + 10) for i in range(40)]
    assert rebalance(records, threshold=0.1, rounds=2, rng=rng) == 0


def test_small_gains_are_not_worth_a_move() -> None:
    records = [server("a", 0, 20), server("b", 20, 40), server("c", 0, 20), server("d", 20, 40, step_time=0.0095)]
    # Moving c to 20:40 would leave 0:20 with one server: worse. Nothing should move.
    assert should_move(records, records[2], N_BLOCKS, 0.1) is None
