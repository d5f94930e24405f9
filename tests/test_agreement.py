"""Agreement across 2 real gloo processes: a vote on one rank stops both on the same boundary."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, vote_at: dict, out, every: int = 1, ask_any_at: int = 0, deferred: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from preemptible.core.agreement import DistributedStopAgreement

    agreement = DistributedStopAgreement(every=every)
    agreement.deferred = deferred
    stopped_at = None
    for step in range(1, 50):
        if deferred and step % 3:
            agreement.reduce_pending()  # the slot before a batch; skipped before every third one (a loop's end)
        # A rank's flag stays set once raised, like a recorded signal.
        decided = agreement.step(10 if rank in vote_at and step >= vote_at[rank] else 0)
        if step == ask_any_at:
            # A question of its own between two boundaries (is rank 0's background write busy?): answered
            # alike on both ranks, and the stop vote in flight is not consumed by it.
            assert agreement.any(rank == 0) is True and agreement.any(False) is False
        if decided:
            stopped_at = (step, decided)
            break
    agreement.close()
    out.put((rank, stopped_at))
    dist.destroy_process_group()


def _run(vote_at: dict, every: int = 1, ask_any_at: int = 0, deferred: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, vote_at, out, every, ask_any_at, deferred)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_one_rank_votes_both_stop_on_the_same_step_with_one_step_latency() -> None:
    results = _run({1: 5})
    assert results == {0: (6, 10), 1: (6, 10)}


def test_votes_at_different_steps_stop_on_the_first() -> None:
    results = _run({0: 9, 1: 3})
    assert results[0] == results[1] == (4, 10)


def test_reducing_every_4_steps_still_stops_both_on_one_step() -> None:
    # vote at step 5 (a boundary without reduction): carried by the rank's flag into step 8's reduction,
    # read at step 12.
    results = _run({1: 5}, every=4)
    assert results == {0: (12, 10), 1: (12, 10)}


def test_asking_any_between_boundaries_leaves_the_vote_in_flight() -> None:
    # rank 1 votes at step 5; both ranks ask another question at step 5, after the vote was issued
    results = _run({1: 5}, ask_any_at=5)
    assert results == {0: (6, 10), 1: (6, 10)}


def test_deferred_reduction_in_a_slot_between_boundaries_has_the_same_latency() -> None:
    """Votes reduced at a point between two boundaries (the Lightning layer: the slot of Lightning's own
    per-batch broadcast) decide at the same boundaries as the asynchronous reduction, also when that
    point is skipped before a boundary, and when another question is asked at a boundary."""
    # the same decisions as the asynchronous tests above; the slot is skipped before steps 3, 6, 9, ...
    assert _run({1: 5}, deferred=True, ask_any_at=5) == {0: (6, 10), 1: (6, 10)}
    assert _run({1: 2}, deferred=True) == {0: (3, 10), 1: (3, 10)}  # decided at a step whose slot was skipped
    assert _run({0: 9, 1: 3}, deferred=True) == {0: (4, 10), 1: (4, 10)}
