"""Exit codes that tell the truth under 2-process gloo DDP (issue 15, point 5).

Real processes launched as ``torchrun`` would (``RANK``/``WORLD_SIZE``/``MASTER_*``), a real gloo group,
the plain-loop session (``tests/scripts/ddp_ranks.py``): a finished run exits 0 on every rank, a preempted
one 144 on every rank, a bug in one rank's step non-zero everywhere and never a code that asks for a
requeue. Every run also shows that the group was destroyed before the interpreter finalized: a gloo
group left to the C++ static destructors is what sometimes aborted finished jobs with exit 134.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import finish_ranks

from preemptible import REQUEUE_EXIT_CODE
from preemptible.core.exit import CRASH_EXIT_CODE
from preemptible.core.schema import Event, read_events

SCRIPT = Path(__file__).parent / "scripts" / "ddp_ranks.py"
TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_ranks(run_dir: Path, mode: str, steps: int = 6, sleep: float = 0.0, world: int = 2,
                 env: dict[str, str] | None = None, per_rank_env: dict[int, dict[str, str]] | None = None,
                 ) -> list[subprocess.Popen[str]]:
    """Start ``world`` ranks of the script (stdout and stderr merged, as text)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        child = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", **(env or {}),
                 **((per_rank_env or {}).get(rank, {}))}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(run_dir), str(steps), mode, str(sleep)],
                                      env=child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen[str]], timeout: float = TIMEOUT) -> tuple[list[int], list[str]]:
    return finish_ranks(procs, timeout)


@pytest.mark.ddp
def test_finished_preempted_and_failed_ranks_exit_with_the_true_code(tmp_path: Path) -> None:
    """Three finished runs, one preempted and one failing, each 2 ranks; both ranks' codes checked."""
    runs = [("finish", tmp_path / f"finish{i}") for i in range(3)] + [("preempt", tmp_path / "preempt"),
                                                                      ("fail", tmp_path / "fail")]
    launched = [(mode, launch_ranks(run_dir, mode)) for mode, run_dir in runs]  # all at once: one wait
    for mode, procs in launched:
        codes, outputs = finish(procs)
        shown = "\n".join(f"--- rank {r} (exit {c})\n{o[-2000:]}" for r, (c, o) in enumerate(zip(codes, outputs)))
        if mode == "finish":
            assert codes == [0, 0], shown
        elif mode == "preempt":
            assert codes == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE], shown
        else:
            assert all(c != 0 for c in codes) and not {REQUEUE_EXIT_CODE, CRASH_EXIT_CODE} & set(codes), shown
        if mode != "fail":  # after an unexplained error the group is left alone (a collective may still be in flight)
            assert all("group at exit: destroyed" in o for o in outputs), shown


@pytest.mark.ddp
def test_a_run_directory_not_shared_by_all_ranks_is_reported_before_training(tmp_path: Path) -> None:
    """Point 6. Simulated: there is one host here, so "node 2's local disk" is a different directory given to
    rank 1 (``TEST_RUN_DIR_VIEW``); the check compares what each rank reads through its own run-directory
    path, so a different path and a same path on another disk look the same to it."""
    procs = launch_ranks(tmp_path / "run", "finish", per_rank_env={1: {"TEST_RUN_DIR_VIEW": str(tmp_path / "node2-local")}})
    codes, outputs = finish(procs)
    shown = "\n".join(f"--- rank {r} (exit {c})\n{o[-2000:]}" for r, (c, o) in enumerate(zip(codes, outputs)))
    assert codes == [1, 1], shown
    for out in outputs:
        assert "the run directory is not shared by all ranks: rank 1" in out and "Fix: put the run directory" in out, shown
    events = list(read_events(tmp_path / "run"))
    assert not [e for e in events if e["event"] in (Event.START, Event.TRAIN_START)], "refused before any training"
