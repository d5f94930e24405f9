"""Resume validation once per run (issue 15, point 7): global rank 0 validates, the other ranks take its verdict.

The ranks here are two views of one run directory in one process (rank 0's and rank 1's
``JobEnvironment``), on real files. That rank 1 does not read the checkpoint again is shown by
flipping a byte after rank 0's verdict: rank 1 still takes rank 0's answer (a size check only), while
its own validation would have rejected the file. The real 2-rank DDP resumes (tests/test_preemption.py)
go through the same path.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from test_store import _save

from preemptible.core.environment import JobEnvironment
from preemptible.core.store import CheckpointStore
from preemptible.core.verdict import validate_as_rank_zero, wait_for_rank_zero


def _env(rank: int, attempt: int = 0) -> JobEnvironment:
    return JobEnvironment.from_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "PREEMPTIBLE_ATTEMPT": str(attempt)})


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] ^= 1
    path.write_bytes(bytes(data))


def test_other_ranks_take_rank_zeros_verdict_without_reading_the_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    _save(store, 4)
    newest = _save(store, 8)
    assert validate_as_rank_zero(store, tmp_path, _env(0), checksum=True).path == newest.path
    _flip(newest.path)  # same size: only a checksum would notice
    assert wait_for_rank_zero(store, tmp_path, _env(1), checksum=True, wait=5).path == newest.path


def test_a_rank_waits_for_rank_zero_and_follows_its_rejection(tmp_path: Path) -> None:
    """Rank 1 starts first; rank 0 then rejects (quarantines) the damaged newest one: both resume from step 4."""
    store = CheckpointStore(tmp_path / "checkpoints")
    older = _save(store, 4)
    _flip(_save(store, 8).path)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(wait_for_rank_zero(store, tmp_path, _env(1), checksum=True, wait=60)))
    waiter.start()
    time.sleep(0.2)  # rank 1 is polling by now (the test still holds if it was not yet)
    assert validate_as_rank_zero(store, tmp_path, _env(0), checksum=True).path == older.path
    waiter.join(timeout=60)
    assert got and got[0].path == older.path


def test_a_verdict_of_another_attempt_or_older_than_the_newest_checkpoint_is_not_used(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    _save(store, 4)
    validate_as_rank_zero(store, tmp_path, _env(0, attempt=0), checksum=True)
    newest = _save(store, 8)
    # Same attempt but a checkpoint rank 0 never judged, then another attempt: no fitting verdict, so after
    # the (short) wait rank 1 validates by itself and finds the newest.
    assert wait_for_rank_zero(store, tmp_path, _env(1, attempt=0), checksum=True, wait=0.3).path == newest.path
    _flip(newest.path)
    validate_as_rank_zero(store, tmp_path, _env(0, attempt=0), checksum=False)  # a verdict of attempt 0 says step 8
    assert wait_for_rank_zero(store, tmp_path, _env(1, attempt=1), checksum=True, wait=0.3).step == 4, \
        "attempt 1 must not take attempt 0's verdict"


def test_a_fresh_run_does_not_wait(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    started = time.monotonic()
    assert wait_for_rank_zero(store, tmp_path, _env(1), checksum=True, wait=60) is None
    assert time.monotonic() - started < 30, "no checkpoint: nothing to wait for"
