"""Faults on purpose for users' own tests (issue 15, point 8): ``preemptible run`` and ``run_preempted`` land a
signal or a fault at the step asked for, however short the steps.

Real processes and real signals: the rank sends the signal to itself (or its process group) at the
boundary of that step (``PREEMPTIBLE_INJECT``, set by the supervisor), instead of the supervisor
watching ``progress.json`` from outside, which landed ``--preempt-at-step 8`` at step 16 on
sub-millisecond steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from preemptible import REQUEUE_EXIT_CODE
from preemptible.cli import main
from preemptible.core.exit import CRASH_EXIT_CODE
from preemptible.core.schema import Event, read_events
from preemptible.tools.testing import run_preempted

PLAIN_LOOP = Path(__file__).parent / "scripts" / "plain_loop.py"


def test_a_signal_planned_at_a_step_lands_there_on_sub_millisecond_steps(tmp_path: Path) -> None:
    """The plain loop's steps take well under a millisecond; SIGTERM planned at step 8 is sent at step 8 and
    the agreed stop follows at the next boundary (the vote of step 8 is read at step 9)."""
    run_dir = tmp_path / "run"
    summary = run_preempted([sys.executable, str(PLAIN_LOOP), str(run_dir), "200", str(tmp_path / "trace.txt")],
                            run_dir=run_dir, at_step=8, signal="TERM", timeout=120, log=tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()[-3000:]
    first = summary.attempts[0]
    assert first.exit_code == REQUEUE_EXIT_CODE and summary.exit_code == 0, log
    assert (first.signal_name, first.signal_step, first.stop_step) == ("SIGTERM", 8, 9), log
    assert summary.attempts[1].resumed_from_step == 9


@pytest.mark.ddp
def test_preemptible_run_freezes_rank_1_at_step_4_and_the_job_leaves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``preemptible run --freeze-at-step 4 --target rank:1`` on the 2-rank example (Lightning's launcher):
    rank 1 stops itself at step 4, rank 0's watchdog (bound set to 2 s here) kills it and leaves with
    the crash code; the first attempt's exit code is the crash code."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PREEMPTIBLE_PEER_TIMEOUT", "2")
    code = main(["run", "--run-dir", str(run_dir), "--freeze-at-step", "4", "--target", "rank:1", "--max-restarts", "0",
                 "--timeout", "240", "--", sys.executable, "-m", "preemptible.examples.train", "--max-steps", "100000",
                 "--devices", "2", "--step-sleep", "0.01"])
    out = capsys.readouterr()
    events = list(read_events(run_dir))
    injected = [(e["rank"], e["action"], e["step"]) for e in events if e["event"] == Event.FAULT_INJECTED]
    lost = [(e["rank"], e["lost_rank"], e["how"]) for e in events if e["event"] == Event.PEER_LOST]
    assert injected == [(1, "freeze", 4)], out.err[-3000:]
    assert lost == [(0, 1, "silent")], out.err[-3000:]
    assert code == CRASH_EXIT_CODE, out.err[-3000:]  # --max-restarts 0: this attempt's code
