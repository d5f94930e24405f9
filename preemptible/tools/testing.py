"""Helpers for users' own pytest suites: preempt a real training command and check it resumed.

Example::

    from preemptible.tools.testing import run_preempted

    def test_my_training_survives_preemption(tmp_path):
        summary = run_preempted(["python", "train.py"], run_dir=tmp_path / "run", at_step=20)
        assert summary.exit_code == 0
        assert summary.attempts[1].resumed_from_step == summary.attempts[0].stop_step
"""

from __future__ import annotations

import os
import signal as _signal
from pathlib import Path
from typing import Optional, Sequence

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


def assert_resumed_on_same_step(summary: RunSummary) -> None:
    """Each relaunch started training on the step its predecessor stopped (and checkpointed) at."""
    for before, after in zip(summary.attempts, summary.attempts[1:]):
        assert not before.timed_out, f"attempt {before.index} hung and was killed"
        if before.stop_step is not None and before.checkpoint is not None:
            assert after.resumed_from_step == before.stop_step, (
                f"attempt {after.index} resumed from step {after.resumed_from_step}, "
                f"but attempt {before.index} stopped and checkpointed at step {before.stop_step}")
