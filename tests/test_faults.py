"""Fault injection (issue 6), in small numbers: SIGKILL during checkpoint writes, damaged files, disk full,
signals in awkward places, retention over repeated preemptions.

The campaigns with hundreds of trials are ``make faults`` (``benchmarks/faults.py``); both run the harness
in :mod:`preemptible.tools.faults`: the child processes used here (a looping checkpoint writer, the example
training with a bigger checkpoint and self-signals) and the checks that recompute every committed checkpoint
from its bytes instead of trusting the store.

Timing. Where a test needs a fault to land at a state (a step, mid-write, after the commit, before the resumed
run's first step), the child holds there (``children train --hold``, a sleep that trains nothing and draws no
random number) until the fault has come, so the test does not race the clock on a busy machine. Where the fault
is defined by timing (SIGKILL at a random moment), the window is kept and the assertions do not depend on where
the fault landed (see the comments there).
"""

from __future__ import annotations

import errno
import json
import re
import signal
from pathlib import Path

import pytest
from helpers import assert_same_as_reference

from preemptible.core.schema import CHECKPOINT_DIR, COMMIT_SUFFIX, RECORD_FILE, Event, RunRecordKey, RunStatus
from preemptible.core.store import CheckpointError, CheckpointStore
from preemptible.tools import faults

MiB = faults.MiB
# The configuration of test_preemption.py, so that the session's uninterrupted reference run is shared.
STEPS, SLEEP = 24, 0.05


def _reference(reference_run, **options):
    return reference_run(max_steps=STEPS, devices=1, step_sleep=SLEEP, **options)


def _chain(tmp_path, scripts, reference, **kw):
    tally = faults.Tally("test")
    results = faults.lightning_chain(tally, tmp_path, scripts, max_steps=STEPS, step_sleep=SLEEP, reference=reference, **kw)
    return tally, results


def _committed(run_dir: Path) -> list[str]:
    return sorted(p.name[: -len(COMMIT_SUFFIX)] for p in (run_dir / CHECKPOINT_DIR).glob("step-*.ckpt" + COMMIT_SUFFIX))


def _name(step: int) -> str:
    return f"step-{step:09d}.ckpt"


# =====================================================================================================
# SIGKILL during checkpoint writes
# =====================================================================================================
def test_sigkill_during_store_writes_keeps_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    # 10 restarts of a writer committing 8 MiB checkpoints in a loop, each SIGKILLed: half when its temp file
    # reaches a random size (certainly mid-write), half after a random delay.
    # The window is the fault itself (a kill at a random moment): wherever a kill lands (start-up, mid-write,
    # between rename and record, during pruning, between writes), every trial must resume the newest complete
    # checkpoint and lose none, so the outcome counts below hold for any timing. Only the last line depends on
    # where a kill landed: a kill timed by the temp file's size lands before the writer's fsync and rename
    # (the writer is still writing or syncing the rest of 8 MiB), and the seed draws several such kills.
    tally = faults.store_kill_trials(tmp_path, 10, seed=61, size=8 * MiB, max_delay=0.5, targeted=0.5)
    assert tally.problems == []
    assert (tally.trials, tally.injected, tally.resumed_newest) == (10, 10, 10)
    assert (tally.partial_loaded, tally.lost, tally.hang) == (0, 0, 0)
    mid_write = sum(n for moment, n in tally.moments.items() if moment.startswith("mid-write"))
    assert tally.stats["targeted"] > 0 and mid_write >= 1, tally.moments


def test_sigkill_during_and_right_after_the_emergency_save(tmp_path: Path, reference_run) -> None:
    # Attempt 0: SIGUSR1 after step 3, then SIGKILL once its checkpoint's commit record is written (on the way out).
    # Attempt 1 resumes that checkpoint; SIGUSR1 after its 3rd step, then SIGKILL in the middle of writing the next
    # checkpoint. Attempt 2 must skip the partial file, resume attempt 0's checkpoint, and finish like an
    # uninterrupted run. The holds: each attempt waits after its 3rd step until the signal is recorded (the stop
    # is the next step), and in the commit / mid-write until it is killed.
    tally, (committed, partial, last) = _chain(
        tmp_path, [faults.fault_kill_when("record", held=True), faults.fault_kill_when("temp", held=True)],
        _reference(reference_run), ballast_mb=16, expect_exit=-signal.SIGKILL,
        options={"hold": ["step:3,after-commit", "step:3,mid-write", "-"]})
    assert tally.problems == [], "\n".join(tally.problems)
    step = committed.event(Event.STOP_AGREED)["step"]
    assert step == 4 and partial.event(Event.STOP_AGREED)["step"] == step + 4
    assert committed.exit_code == -signal.SIGKILL and committed.notes["moment"] == "killed after the commit (on the way out)"
    assert partial.start_step == step, "the checkpoint committed just before the kill is the one resumed"
    assert partial.exit_code == -signal.SIGKILL and partial.notes["moment"] == "killed mid-write (temp file left)"
    assert partial.event(Event.STOP_AGREED)["step"] > step
    assert last.start_step == step and last.exit_code == 0, "the partial write is never loaded; the previous one is"
    assert tally.resumed_newest == 2
    assert not list((tmp_path / "run" / CHECKPOINT_DIR).glob(".tmp-*")), "the dead writer's temp file is removed on restart"
    # 'every loss and the final weights bitwise equal' is checked by the chain (no problem was reported)
    assert tally.notes == ["every loss and the final weights are bitwise those of an uninterrupted run"]


# =====================================================================================================
# Damaged files
# =====================================================================================================
def test_damaged_checkpoints_and_records_are_reported_quarantined_and_the_previous_used(tmp_path: Path) -> None:
    # 40 trials: 2-4 committed checkpoints, the newest 1-3 damaged at random (kind, offset, bits).
    tally = faults.damage_trials(tmp_path, 40, seed=62)
    assert tally.problems == []
    assert set(tally.moments) == set(faults.DATA_DAMAGE + faults.RECORD_DAMAGE), "every kind of damage was drawn"
    assert tally.trials == tally.resumed_newest == 40
    assert (tally.partial_loaded, tally.lost) == (0, 0)
    # every damaged checkpoint except one without record (never committed, by definition) is reported and moved aside
    assert tally.clear_error == tally.injected - tally.moments["record missing"]


def test_quarantine_never_overwrites_an_earlier_quarantined_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    good = faults.commit_payload(store, 1, 1000)
    for i in range(2):  # the same file name, damaged and quarantined twice within the same second
        bad = faults.commit_payload(store, 2, 2000 + i)
        assert bad.path.name == _name(2)
        bad.path.write_bytes(b"damaged %d" % i)
        with pytest.warns(UserWarning, match=bad.path.name):
            assert store.latest_valid().path == good.path
    kept = sorted(p.read_bytes() for p in (tmp_path / "quarantine").iterdir() if COMMIT_SUFFIX not in p.name)
    assert kept == [b"damaged 0", b"damaged 1"]


# =====================================================================================================
# Disk full and write errors
# =====================================================================================================
def test_write_error_at_a_random_offset_is_clear_and_leaves_nothing(tmp_path: Path) -> None:
    # A child process whose files may not grow past a random limit (RLIMIT_FSIZE, SIGXFSZ ignored): EFBIG.
    tally = faults.rlimit_store_trials(tmp_path, 4, seed=63)
    assert tally.problems == []
    assert tally.trials == tally.clear_error == tally.resumed_newest == 4


def test_enospc_on_a_small_tmpfs_is_clear_and_leaves_nothing(tmp_path: Path) -> None:
    with faults.tmpfs(8 * MiB) as mnt:
        if mnt is None:
            pytest.skip("mount -t tmpfs is not permitted here (the RLIMIT_FSIZE tests cover write errors)")
        store = CheckpointStore(mnt / "ckpt")
        prev = faults.commit_payload(store, 1, 256 * 1024)
        faults.fill_until_free(mnt, 1 * MiB)
        with pytest.raises(CheckpointError, match=r"writing checkpoint step-000000002\.ckpt failed: \[Errno 28\] No space left"):
            faults.commit_payload(store, 2, 3 * MiB)
        inv = faults.inventory(mnt / "ckpt")
        assert (inv.temps, inv.orphans, inv.broken) == ([], [], [])
        assert inv.intact == {prev.path.name: 1}
        assert store.latest_valid().path == prev.path


def test_a_failed_commit_record_write_leaves_the_previous_checkpoint_and_no_file(tmp_path: Path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path)
    prev = faults.commit_payload(store, 1, 1000)

    def disk_full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("preemptible.core.store.atomic_write_json", disk_full)
    with pytest.raises(CheckpointError, match=r"committing checkpoint step-000000002\.ckpt failed: .*No space left"):
        faults.commit_payload(store, 2, MiB)
    monkeypatch.undo()
    assert store.latest_valid().path == prev.path
    assert [c.path for c in store.committed()] == [prev.path]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p not in (prev.path, prev.record_path))
    assert leftovers == [], "the renamed data file of the failed commit is removed (it would keep a full disk full)"


def test_disk_full_in_the_emergency_save_is_a_clear_error(tmp_path: Path, reference_run) -> None:
    # Attempt 0 is preempted normally (checkpoint A). Attempt 1 runs with RLIMIT_FSIZE = 1 MiB and a ~4 MiB
    # checkpoint: its emergency save fails. Attempt 2 resumes A and finishes like an uninterrupted run.
    # Each signal goes after the attempt's 3rd step, which holds until it is recorded: the stops are steps 4 and 8.
    tally, (first, failed, last) = _chain(
        tmp_path, [faults.fault_plain_preemption(), faults.fault_plain_preemption()], _reference(reference_run),
        ballast_mb=4, expect_exit=1, scene=1, preexec=faults.fsize_limit(MiB), error_text=("CheckpointError",),
        options={"hold": ["step:3", "step:3", "-"]})
    assert tally.problems == [], "\n".join(tally.problems)
    saved = first.checkpoint_event["step"]
    assert first.exit_code == 144 and _committed(tmp_path / "run") != []
    stop = failed.event(Event.STOP_AGREED)["step"]
    assert (saved, stop) == (4, 8)
    assert failed.start_step == saved and stop > saved and failed.exit_code == 1
    final = faults.final_error(failed.output)  # the last line of the traceback: what the user reads
    assert "CheckpointError: " in final and (_name(stop) in final or f"step {stop}" in final), failed.output[-2000:]
    assert failed.checkpoint_event is None
    assert not list((tmp_path / "run" / CHECKPOINT_DIR).glob(".tmp-*")), "no half-written file is left behind"
    assert last.start_step == saved and last.exit_code == 0, "the next start resumes the intact previous checkpoint"
    assert tally.clear_error == 1 and tally.resumed_newest == 1
    # torch.save turns the file's OSError into a RuntimeError about zip positions: the message must still name the cause.
    assert re.search(rf"CheckpointError: writing checkpoint {_name(stop)} failed: \[Errno 27\] File too large", final), final


# =====================================================================================================
# Signals in awkward places
# =====================================================================================================
def test_storm_of_signals_with_sigterms_while_the_checkpoint_is_written(tmp_path: Path, reference_run) -> None:
    # SIGUSR1 after step 3 (held there until recorded: the stop is step 4); the attempt holds in the middle of
    # writing the checkpoint while 30 SIGTERMs and then SIGUSR1/TERM/USR2 every 0-2 ms, 100 in all, arrive; then
    # it is released and the storm goes on every 0-4 ms until the process is gone.
    tally, (stormed, last) = _chain(tmp_path, [faults.fault_storm(held=True, lead=3)], _reference(reference_run),
                                    ballast_mb=16, expect_exit=144, options={"hold": ["step:3,mid-write", "-"]})
    assert tally.problems == [], "\n".join(tally.problems)
    # A signal that lands while the interpreter finalizes (Python then resets its handlers to SIG_DFL) must not
    # turn the requeue exit into a death by signal.
    assert stormed.exit_code == 144
    assert sum(stormed.sent.values()) >= 100 and stormed.sent["SIGTERM"] >= 30
    assert stormed.notes["moment"] == "SIGTERM burst landed while writing"
    stop = stormed.event(Event.STOP_AGREED)["step"]
    assert stop == 4 and stormed.checkpoint_event["step"] == stop and _committed(tmp_path / "run")[0] == _name(stop)
    assert [e["count"] for e in stormed.events if e["event"] == Event.SIGNAL] == [1], "one signal noted, one save"
    assert last.start_step == stop and last.exit_code == 0
    assert tally.notes == ["every loss and the final weights are bitwise those of an uninterrupted run"]


def test_second_preemption_right_after_resume_and_retention(tmp_path: Path, reference_run) -> None:
    # Five preemptions in one run (keep=2): after step 4; during the resumed run's set-up (before any step); right
    # after the resumed run's first step; then twice more, 4 steps after the start. The checkpoints present are
    # checked after each. Every signal is sent when the progress file (or, for the set-up, the resume event)
    # shows the state, and the attempt holds there until the signal is recorded: each stop is at a known step
    # (the step after the signal), however long the signal takes to arrive.
    present: dict[int, list[str]] = {}

    def snapshot(k: int) -> None:
        present[k] = _committed(tmp_path / "run")

    scripts = [faults.fault_early_second("first"), faults.fault_early_second("before-first-step"),
               faults.fault_early_second("after-first-step"), faults.fault_plain_preemption(4),
               faults.fault_plain_preemption(4)]
    holds = ["step:4", "train-start", "step:1", "step:4", "step:4", "-"]
    tally, results = _chain(tmp_path, scripts, _reference(reference_run), ballast_mb=0, expect_exit=144, between=snapshot,
                            options={"hold": holds})
    assert tally.problems == [], "\n".join(tally.problems)
    assert [r.exit_code for r in results] == [144] * 5 + [0]
    a = results[0].checkpoint_event["step"]
    assert a == 5
    # A signal before the resumed run's first step: it stops at once, saves nothing new, exits for a requeue.
    assert results[1].start_step == a and results[1].event(Event.STOP_AGREED)["step"] == a
    assert results[1].checkpoint_event is None
    # A signal right after the resumed run's first step (a + 1): a new checkpoint at the next step boundary.
    assert results[2].start_step == a
    b = results[2].checkpoint_event["step"]
    assert b == a + 2
    c = results[3].checkpoint_event["step"]
    d = results[4].checkpoint_event["step"]
    assert (c, d) == (b + 5, b + 10)
    assert [r.start_step for r in results] == [0, a, a, b, c, d]
    # keep=2: the oldest committed checkpoint is pruned (deleted with its record, not quarantined), never the one
    # the run resumed from; the finished run leaves its final checkpoint and its predecessor.
    assert present == {0: [], 1: [_name(a)], 2: [_name(a)], 3: [_name(a), _name(b)], 4: [_name(b), _name(c)],
                       5: [_name(c), _name(d)]}
    assert _committed(tmp_path / "run") == [_name(d), _name(STEPS)]
    assert sorted(p.name for p in (tmp_path / "run" / CHECKPOINT_DIR).iterdir()) == sorted(
        [_name(d), _name(d) + COMMIT_SUFFIX, _name(STEPS), _name(STEPS) + COMMIT_SUFFIX])
    assert tally.notes == ["every loss and the final weights are bitwise those of an uninterrupted run"]


def test_signal_during_the_sanity_check(tmp_path: Path, reference_run) -> None:
    options = {"val_every": 5, "sanity_steps": 2}
    reference = _reference(reference_run, **options)
    run_dir = tmp_path / "run"
    first = faults.run_attempt(faults.train_command(tmp_path / "record-0.jsonl", max_steps=STEPS, step_sleep=SLEEP,
                                                    self_signal=["sanity:TERM"], **options), run_dir, 0)
    assert "faults: self-signal SIGTERM at sanity" in first.output
    assert first.exit_code == 144, first.output[-2000:]
    assert first.event(Event.STOP_AGREED)["step"] == 0 and first.checkpoint_event is None, "nothing trained: nothing saved"
    assert faults.load_losses(tmp_path / "record-0.jsonl") == ({}, {})
    assert _committed(run_dir) == []
    second = faults.run_attempt(faults.train_command(tmp_path / "record-1.jsonl", max_steps=STEPS, step_sleep=SLEEP,
                                                     **options), run_dir, 1)
    assert second.exit_code == 0 and second.start_step == 0
    assert_same_as_reference(tmp_path / "record-1.jsonl", reference)


def _final_checkpoint_digest(run_dir: Path, steps: int) -> str:
    """The final checkpoint is committed, intact and loadable, alone and without leftovers: its weights' digest."""
    import torch

    from preemptible.tools.tracing import state_digest

    inv = faults.inventory(run_dir / CHECKPOINT_DIR, loadable=True)
    assert (inv.broken, inv.temps, inv.orphans) == ([], [], [])
    assert inv.intact == {_name(steps): steps}, "the final checkpoint was committed before the signal"
    state = torch.load(run_dir / CHECKPOINT_DIR / _name(steps), map_location="cpu", weights_only=True)["state_dict"]
    return state_digest(type("Saved", (), {"state_dict": lambda self: state})())


def _assert_restart_trains_nothing(tmp_path: Path, run_dir: Path, steps: int, digest: str) -> None:
    again = faults.run_attempt(faults.train_command(tmp_path / "record-1.jsonl", max_steps=steps), run_dir, 1)
    losses, final = faults.load_losses(tmp_path / "record-1.jsonl")
    assert again.exit_code == 0, again.output[-2000:]
    assert [e["event"] for e in again.events] == [Event.RESUME, Event.FINISH], "the restart trains no step"
    assert losses == {} and final == {0: digest}, "it ends with the weights of the final checkpoint"


@pytest.mark.parametrize("point", ["train_end", "fit_end"])
def test_sigterm_after_the_last_step(tmp_path: Path, point: str) -> None:
    # train_end: preemptible's recording handler is in place. fit_end: Lightning has already restored the
    # handlers that were there before fit, and preemptible's own on_fit_end has not run yet.
    run_dir = tmp_path / "run"
    first = faults.run_attempt(faults.train_command(tmp_path / "record-0.jsonl", max_steps=6,
                                                    self_signal=[f"{point}:TERM"]), run_dir, 0)
    assert f"faults: self-signal SIGTERM at {point}" in first.output
    digest = _final_checkpoint_digest(run_dir, 6)
    _assert_restart_trains_nothing(tmp_path, run_dir, 6, digest)
    # Both points: the finished run exits 0 (at fit_end too, where a SIGTERM once killed it with -15 before
    # preemptible's on_fit_end: no "finish" in the journal, run.json still "running").
    assert first.exit_code == 0, first.output[-2000:]
    assert Event.FINISH in [e["event"] for e in first.events]
    if point == "train_end":
        assert faults.load_losses(tmp_path / "record-0.jsonl")[1] == {0: digest}


def test_sigterm_in_the_last_moments_of_fit_teardown(tmp_path: Path) -> None:
    # README, "By design": a SIGTERM in the last moments of fit's teardown, after preemptible's teardown put the
    # previous handlers back (here: the default action), kills the process. The child signals itself from a
    # callback's teardown placed after preemptible's (no timing: the signal is sent at that point). What must
    # hold even then, and does: the run had finished (journal, run.json, trace), its final checkpoint is
    # committed, intact and loadable, and a restart trains nothing (it resumes at the end and exits 0).
    run_dir = tmp_path / "run"
    first = faults.run_attempt(faults.train_command(tmp_path / "record-0.jsonl", max_steps=6,
                                                    self_signal=["teardown:TERM"]), run_dir, 0)
    assert "faults: self-signal SIGTERM at teardown" in first.output
    # The handlers are the user's again (here the default action), so the process dies of the signal (-15),
    # as it would in the script's own code after fit (README, "By design").
    assert first.exit_code == -signal.SIGTERM, (first.exit_code, first.output[-2000:])
    assert not first.timed_out
    events = [e["event"] for e in first.events]
    assert events[-1] == Event.FINISH and Event.EXIT not in events, events
    record = json.loads((run_dir / RECORD_FILE).read_text())
    assert (record[RunRecordKey.STATUS], record[RunRecordKey.FINISHED_STEP]) == (RunStatus.FINISHED, 6), record
    digest = _final_checkpoint_digest(run_dir, 6)
    losses, final = faults.load_losses(tmp_path / "record-0.jsonl")
    assert len([k for k in losses if k[0] == "train"]) == 6 and final == {0: digest}
    _assert_restart_trains_nothing(tmp_path, run_dir, 6, digest)
