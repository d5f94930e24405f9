"""Unit tests of the trainer-neutral session, driven by a small fake training loop (no Lightning, no process launch).

Real signal handlers, real signals to this process, a real run directory and store; the loop is a
counter and the "model" a tensor, so a logic change is tested in milliseconds.
"""

from __future__ import annotations

import os
import signal
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from preemptible import REQUEUE_EXIT_CODE, Preempted, RequeueLimitReached
from preemptible.cli import main as cli_main
from preemptible.core import votes
from preemptible.core.agreement import StopAgreement
from preemptible.core.cause import write_stop_request
from preemptible.core.checkpointing import DictSnapshot, rank_state_in
from preemptible.core.config import SessionConfig
from preemptible.core.deadline import JobDeadline
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import CANCELLED_EXIT_CODE, Cancelled
from preemptible.core.policy import PendingStop, Stopped, StopPolicy, Wait
from preemptible.core.schema import RECORD_FILE, STATE_KEY, Event, RunStatus, StopCauseName, read_events
from preemptible.core.session import PreemptionSession
from preemptible.core.signals import SignalNote
from preemptible.core.store import CheckpointError
from preemptible.tools.runinfo import summarize

ENV = JobEnvironment.from_env({})


class FakeLoop:
    """A training loop of ``total`` steps whose state is a tensor and a step counter."""

    def __init__(self, session: PreemptionSession, total: int = 10) -> None:
        self.session, self.total = session, total
        self.weights = torch.zeros(4)
        self.step = 0
        self.snapshot = DictSnapshot(lambda: {"weights": self.weights.clone(), "step": self.step})

    def resume(self) -> Optional[str]:
        path = self.session.resume_path()
        if path:
            ckpt = torch.load(path, weights_only=True)
            self.weights, self.step = ckpt["weights"], ckpt["step"]
        return path

    def run(self, signal_at: Optional[int] = None, **boundary: Any) -> None:
        path = self.resume()
        self.session.open(rank=0, world_size=1)
        self.session.start(checkpoint=path)
        if self.session.training_started(self.step, 0, loaded=path):
            self.session.leave()
        while self.step < self.total:
            self.weights += 1
            self.step += 1
            if signal_at == self.step:
                os.kill(os.getpid(), signal.SIGUSR1)
            self.session.boundary(self.step, 0, self.snapshot, **boundary)
            self.session.leave_if_stopped()
        self.session.training_ended(self.step, 0, self.snapshot)
        self.session.finished(self.step)
        self.session.end()


def make_session(run_dir: Path, **settings: Any) -> PreemptionSession:
    settings.setdefault("requeue", "local")
    settings.setdefault("deadline", False)
    return PreemptionSession(SessionConfig(run_dir=run_dir, **settings), env=ENV)


def start_fresh(session: PreemptionSession) -> None:
    """What an adapter does at set-up of a first attempt, up to the first step."""
    session.open(rank=0, world_size=1)
    session.start(checkpoint=None)
    assert not session.training_started(0, 0, loaded=None)


def events(run_dir: Path) -> list[str]:
    return [e["event"] for e in read_events(run_dir)]


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


# -- the stop policy ------------------------------------------------------------------------------------
def test_policy_signal_beats_deadline_beats_periodic() -> None:
    now = [1000.0]
    deadline = JobDeadline(ENV, end_time=0.0)  # long past: always too close
    policy = StopPolicy(every_n_steps=2, deadline=deadline, clock=lambda: now[0])
    note = SignalNote(int(signal.SIGUSR1), 1.0, 1)
    assert policy.vote(4, note) == votes.for_signal(signal.SIGUSR1)
    assert policy.vote(4, None) == votes.DEADLINE
    policy.deadline = None
    assert policy.vote(4, None) == votes.PERIODIC_SAVE and policy.vote(5, None) == votes.NOTHING
    assert votes.is_stop(votes.DEADLINE) and not votes.is_stop(votes.PERIODIC_SAVE)


def test_policy_time_based_saves_follow_rank_zero_clock_only() -> None:
    now = [0.0]
    zero = StopPolicy(every_n_minutes=1, clock=lambda: now[0])
    other = StopPolicy(every_n_minutes=1, is_global_zero=False, clock=lambda: now[0])
    assert zero.vote(1, None) == votes.NOTHING
    now[0] = 61.0
    assert zero.vote(2, None) == votes.PERIODIC_SAVE and other.vote(2, None) == votes.NOTHING
    zero.note_save()
    assert zero.vote(3, None) == votes.NOTHING


def test_policy_time_needed_grows_with_the_measured_save_and_step() -> None:
    now = [0.0]
    policy = StopPolicy(clock=lambda: now[0])
    unmeasured = policy.seconds_needed_to_stop()
    now[0] = 3.0
    policy.note_boundary()
    policy.save_seconds = 20.0
    assert policy.seconds_needed_to_stop() == 2 * 3.0 + 2 * 20.0 + 15.0 > unmeasured


# -- the pending stop -------------------------------------------------------------------------------------
def test_pending_stop_transitions() -> None:
    pending = PendingStop()
    assert pending.idle and pending.take(Wait.NEXT_BOUNDARY) == 0
    pending.defer(7, Wait.VALIDATION_END)
    assert not pending.idle and pending.take(Wait.NEXT_BOUNDARY) == 0, "a stop waits only for its own place"
    assert pending.take(Wait.VALIDATION_END) == 7 and pending.idle
    pending.stopped(Stopped(step=3, reason="SIGUSR1", checkpoint=None))
    with pytest.raises(RuntimeError, match="already taken"):
        pending.defer(7, Wait.NEXT_BOUNDARY)
    pending.clear()
    assert pending.idle


def test_config_refuses_bad_values_with_the_fix() -> None:
    with pytest.raises(ValueError, match="verify='md5'"):
        SessionConfig(verify="md5")
    with pytest.raises(ValueError, match="unknown signal 'FOO'"):
        SessionConfig(signals=["FOO"])
    with pytest.raises(ValueError, match="requeue='pbs'.*auto"):
        SessionConfig(requeue="pbs")
    with pytest.raises(ValueError, match="keep=1"):
        SessionConfig(keep=1)
    assert SessionConfig(verify="sha256").verify == "checksum"
    with pytest.raises(TypeError, match="either a SessionConfig or settings"):
        PreemptionSession(SessionConfig(), keep=3)
    assert SessionConfig(signals=["USR1", "TERM", "USR1"]).signals == (signal.SIGUSR1, signal.SIGTERM)


# -- the session through a fake loop ---------------------------------------------------------------------
def test_signal_stops_at_that_step_checkpoints_and_resumes_there(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Preempted) as stopped:
        FakeLoop(make_session(run_dir)).run(signal_at=4)
    assert stopped.value.code == REQUEUE_EXIT_CODE and stopped.value.step == 4 and stopped.value.reason == "SIGUSR1"
    ckpt = torch.load(stopped.value.checkpoint, weights_only=True)
    assert ckpt["step"] == 4 and torch.equal(ckpt["weights"], torch.full((4,), 4.0))
    assert rank_state_in(ckpt, 0) is not None and "rng" in rank_state_in(ckpt, 0)
    assert events(run_dir) == [Event.START, Event.TRAIN_START, Event.SIGNAL, Event.STOP_AGREED, Event.CHECKPOINT,
                               Event.STOP_CAUSE, Event.REQUEUE, Event.EXIT]
    record = (run_dir / RECORD_FILE).read_text()
    assert f'"status": "{RunStatus.PREEMPTED}"' in record and '"requeues": 1' in record
    assert f'"last_stop_cause": "{StopCauseName.REQUESTED}"' in record


def test_a_cancelled_stop_checkpoints_and_ends_without_a_requeue(tmp_path: Path) -> None:
    """The stop request ``preemptible run`` leaves on Ctrl-C: the same checkpoint, then Cancelled (143), no requeue."""
    run_dir, note = tmp_path / "run", tmp_path / "stop-request.json"
    write_stop_request(note, "SIGINT")
    session = PreemptionSession(SessionConfig(run_dir=run_dir, requeue="local", deadline=False),
                                env=replace(ENV, stop_request=str(note)))
    with pytest.raises(Cancelled) as stopped:
        FakeLoop(session).run(signal_at=4)
    assert stopped.value.code == CANCELLED_EXIT_CODE and isinstance(stopped.value, Preempted)
    assert stopped.value.step == 4 and torch.load(stopped.value.checkpoint, weights_only=True)["step"] == 4
    assert events(run_dir) == [Event.START, Event.TRAIN_START, Event.SIGNAL, Event.STOP_AGREED, Event.CHECKPOINT,
                               Event.STOP_CAUSE, Event.EXIT]
    record = (run_dir / RECORD_FILE).read_text()
    assert f'"status": "{RunStatus.CANCELLED}"' in record and '"requeues"' not in record
    info = summarize(run_dir)
    assert info.state == "cancelled" and info.preemptions == 0 and info.attempts[0].outcome == "cancelled"

    loop = FakeLoop(make_session(run_dir))
    loop.run()
    assert loop.step == 10 and torch.equal(loop.weights, torch.full((4,), 10.0))
    resumed = [e for e in read_events(run_dir) if e["event"] == Event.TRAIN_START][-1]
    assert resumed["step"] == 4
    assert events(run_dir)[-2:] == [Event.CHECKPOINT, Event.FINISH]


def test_no_stop_inside_an_accumulation_window(tmp_path: Path) -> None:
    session = make_session(tmp_path / "run")
    loop = FakeLoop(session)
    start_fresh(session)
    session.boundary(1, 0, loop.snapshot)
    os.kill(os.getpid(), signal.SIGUSR1)
    session.boundary(1, 0, loop.snapshot)  # same step: a batch inside an accumulation window
    assert not session.stopping
    session.boundary(2, 0, loop.snapshot)
    assert session.stopping and session.pending.stop is not None and session.pending.stop.step == 2
    session.end()


def test_stop_on_an_epoch_end_waits_for_the_next_boundary(tmp_path: Path) -> None:
    session = make_session(tmp_path / "run")
    loop = FakeLoop(session)
    start_fresh(session)
    os.kill(os.getpid(), signal.SIGUSR1)
    session.boundary(1, 0, loop.snapshot, epoch_ends=True)
    assert not session.stopping and not session.pending.idle
    session.boundary(2, 1, loop.snapshot)
    assert session.pending.stop is not None and session.pending.stop.step == 2
    session.end()


@pytest.mark.parametrize("owed", [True, False], ids=["owing-validation", "trainer-cannot-owe"])
def test_stop_where_validation_is_due_is_taken_when_it_starts(tmp_path: Path, owed: bool) -> None:
    """Taken at the validation's start with the state from there, owing it; a trainer that cannot hand over
    that state (``owed=None``) has the stop wait for the validation's end instead."""
    session = make_session(tmp_path / "run")
    loop = FakeLoop(session)
    start_fresh(session)
    asked: list[int] = []
    os.kill(os.getpid(), signal.SIGUSR1)
    session.boundary(1, 0, loop.snapshot, validation_due=lambda: asked.append(1) or True)
    assert asked == [1] and not session.stopping
    session.validation_started(1, 0, loop.snapshot if owed else None)
    assert session.stopping is owed
    if not owed:
        assert not session.validation_batch_end(1, 0, batch=0)
        session.validation_ended(1, 0, loop.snapshot)
    assert session.pending.stop is not None and session.pending.stop.step == 1
    assert session.pending.stop.owes_validation is owed
    events = [e["event"] for e in read_events(tmp_path / "run")]
    # the checkpoint, then (a stop inside validation) the validation it owes, then the stop's cause
    assert events[-2:] == [Event.VALIDATION_OWED if owed else Event.CHECKPOINT, Event.STOP_CAUSE]
    assert Event.CHECKPOINT in events
    session.end()


def test_signal_before_the_first_step_leaves_without_a_new_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    session = make_session(run_dir)
    os.kill(os.getpid(), signal.SIGTERM)  # during set-up: recorded from construction on
    with pytest.raises(Preempted) as stopped:
        FakeLoop(session).run()
    assert stopped.value.step == 0 and stopped.value.checkpoint is None
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))


def test_stop_right_after_resuming_reuses_the_resumed_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Preempted):
        FakeLoop(make_session(run_dir)).run(signal_at=3)
    first = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    session = make_session(run_dir)
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(Preempted) as again:
        FakeLoop(session).run()
    assert again.value.step == 3 and again.value.checkpoint == str(first[0])
    assert sorted((run_dir / "checkpoints").glob("*.ckpt")) == first, "nothing new to save"


def test_requeue_limit_keeps_the_checkpoint_and_exits_1(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RequeueLimitReached) as limit:
        FakeLoop(make_session(run_dir, max_requeues=0)).run(signal_at=2)
    assert limit.value.code == 1 and "requeue limit reached (0 requeues used)" in str(limit.value)
    requeue = [e for e in read_events(run_dir) if e["event"] == Event.REQUEUE]
    assert [e["outcome"] for e in requeue] == ["limit_reached"]
    assert f'"status": "{RunStatus.REQUEUE_LIMIT}"' in (run_dir / RECORD_FILE).read_text()
    assert list((run_dir / "checkpoints").glob("step-000000002.ckpt"))


class FailingAgreement(StopAgreement):
    """One process standing in for a group in which another rank's save failed."""

    def any(self, flag: bool) -> bool:
        return True


def test_a_save_that_fails_anywhere_fails_on_every_rank_and_leaves_no_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    session = make_session(run_dir)
    loop = FakeLoop(session)
    start_fresh(session)

    def broken(states: Any) -> Any:
        raise OSError("disk on fire")

    loop.snapshot.dump = broken  # type: ignore[method-assign]
    with pytest.raises(CheckpointError, match="emergency checkpoint at step 1 failed: OSError"):
        os.kill(os.getpid(), signal.SIGUSR1)
        session.boundary(1, 0, loop.snapshot)
    assert not list((run_dir / "checkpoints").iterdir()), "no temp file, no commit"

    session.agreement = FailingAgreement()
    loop.snapshot = DictSnapshot(lambda: {"step": 2})
    with pytest.raises(CheckpointError, match="failed on another rank"):
        session._save(loop.snapshot, 2, 0, reason="periodic")
    session.end()


def test_a_failed_background_save_is_journaled_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    session = make_session(run_dir, every_n_steps=2, async_save=True)
    start_fresh(session)

    class Unpicklable:
        def __reduce__(self) -> Any:
            raise RuntimeError("cannot be saved")

    bad = DictSnapshot(lambda: {"thing": Unpicklable()})
    session.boundary(1, 0, bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session.boundary(2, 0, bad)  # periodic save, written on the background thread, fails there
        session.background.wait()
        failed = [e for e in read_events(run_dir) if e["event"] == Event.CHECKPOINT_FAILED]
        assert len(failed) == 1 and failed[0]["step"] == 2 and "cannot be saved" in failed[0]["error"]
        session.end()  # reports it, unless the save itself already did (when the thread failed at once)
    reported = [w for w in caught if "background checkpoint at step 2 failed" in str(w.message)]
    assert len(reported) == 1, "reported once, by the save after it or at the end"
    assert not list((run_dir / "checkpoints").glob("*.ckpt")), "nothing half-written was committed"
    # `preemptible status` shows it.
    info = summarize(run_dir)
    assert [(f.step, f.reason) for f in info.failed_saves] == [(2, "periodic")]
    assert "cannot be saved" in info.failed_saves[0].error
    assert cli_main(["status", str(run_dir)]) == 0
    assert "failed save" in capsys.readouterr().out


def test_periodic_save_is_skipped_while_the_previous_is_still_written(tmp_path: Path) -> None:
    import threading

    run_dir = tmp_path / "run"
    session = make_session(run_dir, every_n_steps=1)
    loop = FakeLoop(session)
    start_fresh(session)
    release = threading.Event()
    session.background.submit(lambda: release.wait(10), step=0)
    try:
        session.boundary(1, 0, loop.snapshot)
    finally:
        release.set()
    session.background.wait()
    skipped = [e for e in read_events(run_dir) if e["event"] == Event.CHECKPOINT_SKIPPED]
    assert [e["step"] for e in skipped] == [1]
    session.boundary(2, 0, loop.snapshot)
    session.background.wait()
    assert [e["step"] for e in read_events(run_dir) if e["event"] == Event.CHECKPOINT] == [2]
    session.end()


def test_journal_refuses_what_the_schema_does_not_know(tmp_path: Path) -> None:
    session = make_session(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown journal event 'stopped'"):
        session.run.journal.append("stopped", step=1)
    with pytest.raises(ValueError, match="has no field"):
        session.run.journal.append(Event.FINISH, steps=1)
    assert STATE_KEY == "PreemptionCallback"


def test_max_requeues_from_the_environment_is_checked_where_it_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREEMPTIBLE_MAX_REQUEUES", "lots")
    assert JobEnvironment.from_env().max_requeues == "lots", "reading the environment never fails"
    assert SessionConfig(max_requeues=3).max_requeues == 3, "an explicit value does not look at it"
    with pytest.raises(ValueError, match="PREEMPTIBLE_MAX_REQUEUES='lots' is not a whole number"):
        SessionConfig()
    monkeypatch.setenv("PREEMPTIBLE_MAX_REQUEUES", "7")
    assert SessionConfig().max_requeues == 7


def test_several_ranks_without_a_process_group_is_refused_with_the_fix(tmp_path: Path) -> None:
    session = make_session(tmp_path / "run")
    with pytest.raises(RuntimeError, match="world_size=2 but torch.distributed has no process group.*init_process_group"):
        session.open(rank=0, world_size=2)
    session.end()


def test_a_committed_checkpoint_stays_good_when_the_clean_up_after_it_fails(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    session = make_session(run_dir)
    loop = FakeLoop(session)
    start_fresh(session)

    def full_disk(**kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session.run.store, "prune", full_disk)
    os.kill(os.getpid(), signal.SIGUSR1)
    session.boundary(1, 0, loop.snapshot)  # the emergency save: committed, then the prune fails
    assert session.pending.stop is not None and session.pending.stop.checkpoint is not None
    assert session.resume_path() == str(session.pending.stop.checkpoint), "committed and valid"
    with pytest.raises(Preempted):
        session.leave()

