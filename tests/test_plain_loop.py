"""A plain PyTorch loop (no Lightning) on the session: signal → agreed stop → checkpoint → Preempted → resume on the same step.

Real processes and a real signal from the local simulator; the uninterrupted reference is the same
script without a signal (its numbers do not depend on preemptible: the session only reads the RNG).
"""

from __future__ import annotations

import sys
from pathlib import Path

from preemptible import REQUEUE_EXIT_CODE
from preemptible.core.schema import Event, read_events, read_trace
from preemptible.tools.testing import run_preempted

SCRIPT = Path(__file__).parent / "scripts" / "plain_loop.py"
STEPS = 30


def test_plain_loop_resumes_on_the_same_step_bitwise(tmp_path: Path) -> None:
    ref_trace, got_trace = tmp_path / "reference.txt", tmp_path / "preempted.txt"
    reference = run_preempted([sys.executable, str(SCRIPT), str(tmp_path / "ref"), str(STEPS), str(ref_trace)],
                              run_dir=tmp_path / "ref", plan=(), timeout=120, log=tmp_path / "ref.log")
    assert reference.exit_code == 0 and len(reference.attempts) == 1, (tmp_path / "ref.log").read_text()[-2000:]

    run_dir = tmp_path / "run"
    summary = run_preempted([sys.executable, str(SCRIPT), str(run_dir), str(STEPS), str(got_trace), "0.05"],
                            run_dir=run_dir, at_step=10, signal="TERM", timeout=120, log=tmp_path / "run.log")
    log = (tmp_path / "run.log").read_text()
    assert summary.exit_code == 0, log[-2000:]
    first, second = summary.attempts[0], summary.attempts[1]
    assert first.exit_code == REQUEUE_EXIT_CODE and len(summary.attempts) == 2, log[-2000:]
    assert first.stop_step is not None and 10 <= first.stop_step < STEPS
    assert second.resumed_from_step == first.stop_step

    events = list(read_events(run_dir))
    stops = [e for e in events if e["event"] == Event.STOP_AGREED]
    saves = [e for e in events if e["event"] == Event.CHECKPOINT and e["reason"] == "SIGTERM"]
    assert [e["step"] for e in stops] == [first.stop_step] and [e["step"] for e in saves] == [first.stop_step]
    assert [e["code"] for e in events if e["event"] == Event.EXIT] == [REQUEUE_EXIT_CODE]
    assert events[-1]["event"] == Event.FINISH and events[-1]["step"] == STEPS

    want, got = read_trace(ref_trace), read_trace(got_trace)
    assert not got.duplicates, f"steps trained twice after the resume: {got.duplicates}"
    assert sorted(key[4] for key in got.entries) == list(range(1, STEPS + 1))
    assert got.losses == want.losses, "a loss differs from the uninterrupted run"
    assert got.final == want.final and set(got.final) == {0}
    assert {e["attempt"] for e in got.entries.values()} == {0, 1}, "both attempts trained"
