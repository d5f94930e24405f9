"""End-to-end preemption with real processes and real signals (issue: foundation).

Each scenario runs the example training under ``preemptible run``'s supervisor, sends a real
signal, lets it relaunch, and checks: it resumed on the step it stopped at, reached max_steps,
and every loss and the final weights are bitwise those of an uninterrupted run.

Scenarios that fit one configuration share one run, one scenario per attempt (every process launch
pays seconds of imports): SIGUSR1 to every rank, SIGTERM to every rank, a burst of 50 signals and,
under DDP, a signal to rank 1 only are the four preemptions of one run; a signal before the first
step and one during validation are the two of another.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_same_as_reference, example_command

from preemptible import REQUEUE_EXIT_CODE
from preemptible.core.schema import REASON_FINISHED, REASON_PERIODIC, Event, TraceKind, read_events
from preemptible.tools.simulator import Preemption
from preemptible.tools.testing import assert_resumed_on_same_step, run_preempted

STEPS = 24
SLEEP = 0.05
WORLDS = [pytest.param(1, id="1proc"), pytest.param(2, id="ddp2", marks=pytest.mark.ddp)]


def _run(tmp_path: Path, devices: int, **kw):
    record = tmp_path / "record.jsonl"
    options = kw.pop("options", {})
    cmd = example_command(record, max_steps=STEPS, devices=devices, step_sleep=SLEEP, **options)
    summary = run_preempted(cmd, run_dir=tmp_path / "run", timeout=180, log=tmp_path / "log.txt", **kw)
    return summary, record


def _check(summary, tmp_path: Path, preemptions: int = 1) -> None:
    log = (tmp_path / "log.txt").read_text()[-4000:]
    assert not any(a.timed_out for a in summary.attempts), f"an attempt hung:\n{log}"
    assert summary.exit_code == 0, log
    assert summary.preemptions == preemptions, log
    assert_resumed_on_same_step(summary)
    finishes = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == Event.FINISH]
    assert [e["step"] for e in finishes] == [STEPS]


def _of_attempt(events: list[dict], attempt: int, event: str) -> list[dict]:
    return [e for e in events if e["event"] == event and e["restart_count"] == attempt]


@pytest.mark.parametrize("devices", WORLDS)
def test_sigusr1_sigterm_a_burst_and_a_signal_to_rank1_only(tmp_path: Path, devices: int, reference_run) -> None:
    """One run, one preemption per attempt: SIGUSR1 to every rank, SIGTERM to every rank, a burst of 50
    SIGUSR1 and, with 2 ranks, SIGUSR1 to rank 1 only (which must stop both ranks on one step)."""
    # Each signal is planned a few steps after the previous attempt stopped (the stop comes 1-2 steps after
    # the signal), and the last one leaves several steps before the end.
    plan = [Preemption(at_step=7, signal="USR1"), Preemption(at_step=10, signal="TERM"),
            Preemption(at_step=14, signal="USR1", repeat=50)]
    if devices == 2:
        plan.append(Preemption(at_step=18, signal="USR1", target="rank:1"))
    summary, record = _run(tmp_path, devices, plan=plan)
    _check(summary, tmp_path, preemptions=len(plan))
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    # SIGUSR1 to every rank
    first = summary.attempts[0]
    assert first.exit_code == REQUEUE_EXIT_CODE and first.checkpoint and first.stop_step >= 7
    # SIGTERM to every rank: every rank journaled it, and the stop and its checkpoint carry it as their reason
    assert {(e["rank"], e["signal"]) for e in _of_attempt(events, 1, Event.SIGNAL)} == {(r, "SIGTERM") for r in range(devices)}
    assert [e["reason"] for e in _of_attempt(events, 1, Event.STOP_AGREED)] == ["SIGTERM"]
    assert [e["reason"] for e in _of_attempt(events, 1, Event.CHECKPOINT)] == ["SIGTERM"]
    # the burst: one signal burst, one emergency checkpoint
    assert [e["reason"] for e in _of_attempt(events, 2, Event.CHECKPOINT)] == ["SIGUSR1"], \
        "one signal burst, one emergency checkpoint"
    saves = [e["reason"] for e in events if e["event"] == Event.CHECKPOINT]
    assert saves == ["SIGUSR1", "SIGTERM", "SIGUSR1"] + ["SIGUSR1"] * (devices == 2) + [REASON_FINISHED], \
        "one emergency checkpoint per preemption (and the final one)"
    if devices == 2:
        # SIGUSR1 to rank 1 only
        signalled = {e["rank"] for e in _of_attempt(events, 3, Event.SIGNAL)}
        exits = _of_attempt(events, 3, Event.EXIT)
        assert signalled == {1}, "only rank 1 should have received the signal"
        assert {e["rank"] for e in exits} == {0, 1} and len({e["step"] for e in exits}) == 1, "both ranks stop on one step"
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=devices, step_sleep=SLEEP))


def test_signal_before_the_first_step_then_during_validation(tmp_path: Path, reference_run) -> None:
    """Attempt 0: a signal once the run has started, before any step (it lands in the sanity check: two
    validation batches after set-up). Attempt 1: a signal while the validation of step 10 runs.

    ``--hold-for-signal`` holds the run at those points until the signal has been recorded, so it lands
    there however fast or slow the machine is."""
    options = {"val_every": 5, "sanity_steps": 2, "hold_for_signal": ["sanity", "v10"]}
    record = tmp_path / "record.jsonl"
    cmd = example_command(record, max_steps=STEPS, devices=1, step_sleep=SLEEP, **options)
    # Progress is reported right after train step 10, when validation of that step begins.
    summary = run_preempted(cmd, run_dir=tmp_path / "run", timeout=180, log=tmp_path / "log.txt",
                            plan=[Preemption(at_event=Event.START), Preemption(at_step=10)])
    _check(summary, tmp_path, preemptions=2)
    first = summary.attempts[0]
    assert first.stop_step == 0 and first.checkpoint is None, "nothing trained yet: nothing to save"
    assert summary.attempts[1].resumed_from_step == 0
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    assert [e["step"] for e in _of_attempt(events, 0, Event.SIGNAL)] == [0], "the signal before the first step was journaled"
    # The run held in the first batch of the validation of step 10 until the signal was recorded there: the stop
    # is taken at that validation batch's end, saving the state from the validation's start (owing it).
    assert [(e["step"], e["place"], e["batch"]) for e in _of_attempt(events, 1, Event.SIGNAL)] == [(10, "validation", 0)]
    assert [e["step"] for e in _of_attempt(events, 1, Event.STOP_AGREED)] == [10] == [summary.attempts[1].stop_step]
    assert [e["step"] for e in _of_attempt(events, 1, Event.CHECKPOINT)] == [10]
    assert [e["step"] for e in _of_attempt(events, 1, Event.VALIDATION_OWED)] == [10]
    assert [e["step"] for e in _of_attempt(events, 2, Event.VALIDATION_REDONE)] == [10]
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=1, step_sleep=SLEEP, **options))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path: Path, reference_run) -> None:
    record = tmp_path / "record.jsonl"
    cmd = example_command(record, max_steps=STEPS, devices=1, step_sleep=SLEEP)
    run_dir = tmp_path / "run"
    # Two preemptions, and no relaunch after the second: two committed checkpoints remain.
    summary = run_preempted(cmd, run_dir=run_dir, plan=[Preemption(at_step=5), Preemption(at_step=13)],
                            max_restarts=1, timeout=180, log=tmp_path / "log.txt")
    assert summary.exit_code == REQUEUE_EXIT_CODE and len(summary.attempts) == 2
    older, newest = summary.attempts[0].stop_step, summary.attempts[1].stop_step
    newest_file = run_dir / "checkpoints" / f"step-{newest:09d}.ckpt"
    data = bytearray(newest_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle: same size, wrong checksum
    newest_file.write_bytes(bytes(data))
    # The losses trained after the older checkpoint will be trained again: drop them from the record
    # so the comparison checks the continuation from the older checkpoint.
    kept = [line for line in record.read_text().splitlines()
            if json.loads(line).get("step", 0) <= older and json.loads(line)["kind"] != TraceKind.FINAL]
    record.write_text("".join(line + "\n" for line in kept))

    again = run_preempted(cmd, run_dir=run_dir, timeout=180, log=tmp_path / "log2.txt")
    log = (tmp_path / "log2.txt").read_text()
    assert again.exit_code == 0, log[-3000:]
    assert "fails its crc32 checksum" in log and newest_file.name in log, "the damaged checkpoint is reported by name"
    assert again.attempts[0].resumed_from_step == older
    quarantined = list((run_dir / "checkpoints" / "quarantine").iterdir())
    assert any(p.name.startswith(newest_file.name) for p in quarantined), "the damaged file is moved aside, not deleted"
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=1, step_sleep=SLEEP))


def test_empty_run_dir_is_a_fresh_start(tmp_path: Path) -> None:
    from preemptible import PreemptionCallback, latest_checkpoint

    run_dir = tmp_path / "run"
    assert PreemptionCallback(run_dir=run_dir).resume_path() is None
    assert latest_checkpoint(run_dir) is None
    record = tmp_path / "record.jsonl"
    summary = run_preempted(example_command(record, max_steps=6), run_dir=run_dir, timeout=120, log=tmp_path / "log.txt")
    assert summary.exit_code == 0 and len(summary.attempts) == 1
    assert summary.attempts[0].resumed_from_step == 0
    assert [e["event"] for e in read_events(run_dir / "events.jsonl")][0] == Event.START


@pytest.mark.parametrize("devices", WORLDS)
def test_requeue_limit_stops_with_a_message_and_keeps_the_checkpoint(tmp_path: Path, devices: int) -> None:
    record = tmp_path / "record.jsonl"
    cmd = example_command(record, max_steps=STEPS, devices=devices, step_sleep=SLEEP, max_requeues=1)
    summary = run_preempted(cmd, run_dir=tmp_path / "run", plan=[Preemption(at_step=4), Preemption(at_step=12)],
                            timeout=180, log=tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert [a.exit_code for a in summary.attempts] == [REQUEUE_EXIT_CODE, 1], log[-3000:]
    assert "requeue limit reached (1 requeues used)" in log
    last = summary.attempts[1]
    assert last.checkpoint and Path(last.checkpoint).exists(), "the checkpoint is written and kept"
    exits = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == Event.EXIT]
    assert {e["code"] for e in exits[-devices:]} == {1}, "every rank exits 1: nobody asks for a requeue"


@pytest.mark.ddp
def test_ddp_background_checkpoints_every_step_with_a_signal_to_rank1(tmp_path: Path, reference_run) -> None:
    """Periodic background checkpoints under DDP: only rank 0 writes, so only it knows whether its last
    write is still in flight; the ranks must agree to skip (never deadlock on a save that one rank skips),
    and a stop vote issued at a periodic save's step must survive the save's own collectives."""
    options = {"options": {"every_n_steps": 1}}
    summary, record = _run(tmp_path, 2, at_step=9, signal="USR1", target="rank:1", **options)
    _check(summary, tmp_path)
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    periodic = [e for e in events if e["event"] == Event.CHECKPOINT and e["reason"] == REASON_PERIODIC]
    skipped = [e for e in events if e["event"] == Event.CHECKPOINT_SKIPPED]
    assert all(e["background"] for e in periodic)
    # Every boundary decides a save or an agreed skip, except: the first boundary of each attempt (the vote is
    # read one step later), the stop step (the emergency save), the last one (the final save) and an epoch's
    # last batch (the example's 256 samples, batch 16, 2 ranks: 8 per epoch), whose save moves one step on.
    stop = next(e["step"] for e in events if e["event"] == Event.STOP_AGREED)
    expected = set(range(2, STEPS)) - {stop, stop + 1} - set(range(8, STEPS, 8))
    decided = {e["step"] for e in periodic} | {e["step"] for e in skipped}
    assert expected <= decided, f"no save and no agreed skip at steps {sorted(expected - decided)}"
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=2, step_sleep=SLEEP, every_n_steps=1))
