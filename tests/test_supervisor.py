"""The in-process supervisor's registry (core/supervisor.py): one answer per process, one claimant per attempt.

The end-to-end behaviour (a crashed submitit job requeued by its ranks) is tested on LocalExecutor
(tests/test_submitit_local.py) and on the cluster (tests/slurm/test_submitit_crash_slurm.py).
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Iterator, Optional

import pytest

from preemptible.core import supervisor
from preemptible.core.exit import CRASH_EXIT_CODE, REQUEUE_EXIT_CODE


@pytest.fixture(autouse=True)
def no_hook() -> Iterator[None]:
    previous = supervisor.set_crash_supervisor(None)
    yield
    supervisor.set_crash_supervisor(previous)


def test_without_a_hook_the_crash_code_stays() -> None:
    assert supervisor.crash_exit_code(CRASH_EXIT_CODE) == CRASH_EXIT_CODE


def test_the_hook_answers_once_per_process_whichever_thread_asks_first() -> None:
    calls: list[int] = []
    entered, release = threading.Event(), threading.Event()

    def hook(code: int) -> Optional[int]:
        calls.append(code)
        entered.set()
        release.wait(10)
        return REQUEUE_EXIT_CODE

    supervisor.set_crash_supervisor(hook)
    answers: list[int] = []
    watchdog = threading.Thread(target=lambda: answers.append(supervisor.crash_exit_code(CRASH_EXIT_CODE)))
    watchdog.start()
    assert entered.wait(10)
    main = threading.Thread(target=lambda: answers.append(supervisor.crash_exit_code(CRASH_EXIT_CODE)))
    main.start()  # waits for the first answer instead of asking again
    release.set()
    watchdog.join(10)
    main.join(10)
    assert calls == [CRASH_EXIT_CODE] and answers == [REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE]
    supervisor.set_crash_supervisor(hook)  # a new registration asks again
    assert supervisor.crash_exit_code(CRASH_EXIT_CODE) == REQUEUE_EXIT_CODE and len(calls) == 2


def test_a_failing_hook_leaves_with_the_crash_code() -> None:
    def hook(code: int) -> Optional[int]:
        raise OSError("run directory gone")

    supervisor.set_crash_supervisor(hook)
    assert supervisor.crash_exit_code(CRASH_EXIT_CODE) == CRASH_EXIT_CODE


def _claim(run_dir: str, rank: int, results: "multiprocessing.Queue[tuple[int, bool]]") -> None:
    results.put((rank, supervisor.claim_attempt(run_dir, "77", 0, rank, "crash")))


def test_one_claimant_per_attempt_among_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[tuple[int, bool]] = context.Queue()
    processes = [context.Process(target=_claim, args=(str(tmp_path), rank, results)) for rank in range(4)]
    for process in processes:
        process.start()
    claims = dict(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(30)
    assert sorted(claims.values()) == [False, False, False, True], claims
    assert supervisor.claimed_attempts(tmp_path, "77") == 1 and supervisor.claimed_attempts(tmp_path, "78") == 0
    assert supervisor.claim_attempt(tmp_path, "77", 1, 0, "requeue")  # the next attempt has its own claim
    assert supervisor.claimed_attempts(tmp_path, "77") == 2
