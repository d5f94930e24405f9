"""Helpers for users' own pytest suites: preempt a real training command and check it resumed.

Example::

    from preemptible.tools.testing import assert_resumed_on_same_step, run_preempted

    def test_my_training_survives_preemption(tmp_path):
        summary = run_preempted(["python", "train.py"], run_dir=tmp_path / "run", at_step=20)
        assert_resumed_on_same_step(summary)  # preempted, resumed on the step it stopped at, finished with 0
"""

from __future__ import annotations

import os
import signal as _signal
from pathlib import Path
from typing import Optional, Sequence

from preemptible.core.exit import REQUEUE_EXIT_CODE
from preemptible.tools.simulator import Attempt, LocalSupervisor, Preemption, RunSummary
from preemptible.tools.tracing import SignalAtStep, StepRecorder, state_digest

__all__ = ["run_preempted", "Preemption", "RunSummary", "Attempt", "assert_resumed_on_same_step",
           "StepRecorder", "SignalAtStep", "state_digest"]


def run_preempted(
    command: Sequence[str],
    run_dir: os.PathLike[str] | str,
    *,
    at_step: Optional[int] = None,
    after_seconds: Optional[float] = None,
    at_event: Optional[str] = None,
    signal: str | int | _signal.Signals = "USR1",
    target: str = "tree",
    repeat: int = 1,
    plan: Sequence[Preemption] = (),
    max_restarts: int = 5,
    timeout: float = 300.0,
    env: Optional[dict[str, str]] = None,
    log: Optional[os.PathLike[str] | str] = None,
) -> RunSummary:
    """Run ``command``, preempt its first attempt as described (or follow ``plan``), relaunch until done.

    Every attempt is bounded by ``timeout`` seconds: a hung run is killed and shows up as
    ``attempt.timed_out`` instead of hanging the test session. Output goes to ``log`` if given.
    """
    steps = list(plan)
    if at_step is not None or after_seconds is not None or at_event is not None:
        steps.insert(0, Preemption(at_step=at_step, after_seconds=after_seconds, at_event=at_event,
                                   signal=_signal.Signals(signal) if isinstance(signal, int) else signal,  # type: ignore[arg-type]
                                   target=target, repeat=repeat))
    out = open(log, "ab") if log is not None else None
    try:
        return LocalSupervisor(command, run_dir=Path(run_dir), plan=steps, max_restarts=max_restarts,
                               timeout=timeout, env=env, stdout=out).run()
    finally:
        if out is not None:
            out.close()


def assert_resumed_on_same_step(summary: RunSummary, *, min_preemptions: int = 1) -> None:
    """The run was preempted, every relaunch resumed on the step its predecessor stopped at, and it finished.

    Strict, attempt by attempt: every attempt but the last must have exited with the requeue exit code
    after an agreed stop (``stop_agreed`` in the journal) and a committed checkpoint (``checkpoint``) —
    unless it stopped on the step it started training on (a signal before its first step: nothing new to
    save, the state is the one it started from) — and the next attempt must have started training
    (``train_start``) on that very step; the last attempt
    must have exited with code 0, and the run must have been relaunched at least ``min_preemptions``
    times (pass ``min_preemptions=0`` for a run that may finish without a preemption). An attempt that
    hung and was killed fails it. The ``AssertionError`` names the attempt and what was missing.

    Stops, checkpoints and resumes are what the supervisor read from the run's journal (``run_preempted``
    always has the run directory).
    """
    attempts = summary.attempts
    assert attempts, "the run has no attempts (nothing was started)"
    preemptions = len(attempts) - 1
    assert preemptions >= min_preemptions, (
        f"the run was relaunched {preemptions} time(s), expected at least {min_preemptions}: "
        f"{'nothing was resumed' if not preemptions else 'fewer preemptions than planned'} "
        "(did the signal come after training ended?)")
    for before, after in zip(attempts, attempts[1:]):
        i = before.index
        assert not before.timed_out, f"attempt {i} hung and was killed after the timeout"
        assert before.exit_code == REQUEUE_EXIT_CODE, (
            f"attempt {i} exited with code {before.exit_code}, not the requeue exit code {REQUEUE_EXIT_CODE}, "
            f"and was followed by attempt {after.index}")
        assert before.stop_step is not None, (
            f"attempt {i} exited with the requeue exit code without an agreed stop (no stop_agreed event of "
            "rank 0 in the run's journal)")
        # A stop before the attempt's first step (a signal during set-up) has nothing new to save: the state
        # is the one the attempt started from (a fresh start, or the checkpoint it resumed), so no checkpoint.
        stopped_before_training = before.stopped_before_training
        assert before.checkpoint is not None or stopped_before_training, (
            f"attempt {i} stopped at step {before.stop_step} but committed no checkpoint (no checkpoint event "
            f"of rank 0 in the run's journal; it had started training at step {before.resumed_from_step})")
        assert after.resumed_from_step is not None, (
            f"attempt {after.index} never started training (no train_start event of rank 0 in the run's journal); "
            f"attempt {i} had stopped and checkpointed at step {before.stop_step}")
        assert after.resumed_from_step == before.stop_step, (
            f"attempt {after.index} resumed from step {after.resumed_from_step}, "
            f"but attempt {i} stopped and checkpointed at step {before.stop_step}")
    last = attempts[-1]
    assert not last.timed_out, f"the last attempt ({last.index}) hung and was killed after the timeout"
    assert last.exit_code == 0, (
        f"the last attempt ({last.index}) exited with code {last.exit_code}, not 0"
        + (" (it asked to be requeued: max_restarts reached?)" if last.exit_code == REQUEUE_EXIT_CODE else ""))
