"""Agreement across 2 real gloo processes: a vote on one rank stops both on the same boundary."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, vote_at: dict, out, every: int = 1, ask_any_at: int = 0, deferred: bool = False) -> None:
    import torch.distributed as dist  # here, so that a worker that needs no torch starts fast

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


def _run(vote_at: dict, every: int = 1, ask_any_at: int = 0, deferred: bool = False, timeout: float = 120,
         target=None, spawned: list | None = None) -> dict:
    """Both ranks' (step, decision); a rank that fails, hangs or never answers fails the test by name.

    The workers are reaped in every case (terminated, then killed): a deadlock in the agreement is a test
    failure after ``timeout`` seconds, not a gloo wait of half an hour at interpreter exit.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target or _worker, args=(r, port, vote_at, out, every, ask_any_at, deferred),
                         daemon=True) for r in range(2)]
    if spawned is not None:
        spawned.extend(procs)
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        results: dict = {}
        while len(results) < len(procs):
            try:
                rank, stopped_at = out.get(timeout=0.2)
                results[rank] = stopped_at
                continue
            except queue.Empty:
                pass
            failed = {r: p.exitcode for r, p in enumerate(procs) if r not in results and p.exitcode is not None}
            assert not failed, f"rank(s) exited without a result (rank: exit code): {failed}; see the captured stderr"
            if time.monotonic() > deadline:
                raise AssertionError(f"rank(s) {sorted(set(range(len(procs))) - set(results))} gave no result within "
                                     f"{timeout:.0f} s (stuck in the agreement?); results so far: {results}")
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        stuck = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not stuck, f"rank(s) {stuck} did not exit after giving their result (stuck in close/destroy?)"
        codes = {r: p.exitcode for r, p in enumerate(procs)}
        assert set(codes.values()) == {0}, f"exit codes by rank: {codes}"
        return results
    finally:
        _reap(procs)
        out.close()
        out.cancel_join_thread()


def _reap(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        if p.pid is None:  # never started
            continue
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _rank_1_hangs(rank: int, port: int, vote_at: dict, out, *rest) -> None:
    if rank == 1:
        time.sleep(3600)  # a rank stuck in a collective that never completes
    out.put((rank, None))


def test_a_rank_that_hangs_fails_the_test_by_name_and_every_worker_is_reaped() -> None:
    spawned: list = []
    with pytest.raises(AssertionError, match=r"rank\(s\) \[1\] gave no result within 10 s"):
        _run({}, timeout=10, target=_rank_1_hangs, spawned=spawned)
    assert len(spawned) == 2 and not any(p.is_alive() for p in spawned)


def _rank_1_fails(rank: int, port: int, vote_at: dict, out, *rest) -> None:
    if rank == 1:
        raise SystemExit(3)  # a rank that dies (the other one would wait for it in the next collective)
    time.sleep(3600)


def test_a_rank_that_dies_fails_the_test_at_once_by_name() -> None:
    spawned: list = []
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"rank\(s\) exited without a result \(rank: exit code\): \{1: 3\}"):
        _run({}, timeout=60, target=_rank_1_fails, spawned=spawned)
    assert time.monotonic() - t0 < 30, "a dead rank is noticed before the deadline"
    assert not any(p.is_alive() for p in spawned)


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
