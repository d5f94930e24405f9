"""The trainer-neutral preemption session: record → agree → checkpoint → requeue → resume.

A :class:`PreemptionSession` is what every adapter drives (the Lightning callback, a plain PyTorch
loop): it owns the signal handlers that only record, resume discovery and validation, the run
lock, the votes and the agreement, the pending stop, the two-phase save through the store, the
journal and ``run.json``, the requeue request and leaving with :class:`~preemptible.Preempted`.
The adapter tells it where the loop is (``open``/``start``/``training_started``/``boundary``/
``validation_started``/``validation_batch_end``/``validation_ended``/``epoch_started``/``training_ended``/
``finished``/``end``; ``leave`` once it is ``stopping``; ``abandon`` on an error) and hands it a
:class:`~preemptible.core.checkpointing.Snapshot` that dumps the trainer's state.
It imports neither ``lightning`` nor ``pytorch_lightning``.

A plain loop drives it directly: :class:`preemptible.loop.PreemptibleLoop` wraps it for hand-written
loops and Fabric; ``tests/scripts/plain_loop.py`` drives it by hand; ``tests/test_session.py`` tests the
logic on a fake loop.

What lives where: the session keeps the loop's points and the pending stop across them on every rank;
what each point *does* lives elsewhere (policy, checkpointing, leaving, verdict, inject). The guard
against peers lost without warning (the peer watchdog, the in-rank crash supervisor, the ``on_peer_lost``
hooks, the exit after a lost peer) is :class:`~preemptible.core.peers.PeerGuard`, owned as ``peers``.

Why it is still longer than the ~400 lines a module aims for: it is the one place that sees every point
of the loop and keeps the pending stop consistent across them. The validation-stop points stay: each is
a few lines of agreement and pending-stop bookkeeping around the session's own emergency save, so apart
they would call back into the session at every step. The next candidate to move out is the stop-taking
itself (the emergency, periodic and final saves, and the requeue-limit reads around them).
"""

from __future__ import annotations

import logging
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from preemptible.core import cause as stop_cause
from preemptible.core import leaving, procgroup, votes
from preemptible.core import verdict as resume_verdict
from preemptible.core.agreement import StopAgreement, make_agreement
from preemptible.core.checkpointing import BackgroundWriter, Snapshot, save_checkpoint
from preemptible.core.config import SessionConfig
from preemptible.core.crashes import failure_kind
from preemptible.core.elastic import warn_if_agent_drops_signals
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import Preempted, RequeueLimitReached
from preemptible.core.inject import FaultPlan, fire, parse_faults
from preemptible.core.lock import RunLock, RunLockedError
from preemptible.core.peers import PeerGuard
from preemptible.core.policy import (
    PendingStop,
    Stopped,
    StopPolicy,
    Wait,
    deadline_from_setting,
    last_save_seconds,
    warn_if_lead_too_short,
)
from preemptible.core.requeue import RequeueError, select_backend
from preemptible.core.rundir import ProgressFile, RunDirectory, resolve_run_dir
from preemptible.core.schema import (
    REASON_FINISHED,
    REASON_PERIODIC,
    Event,
    FailureKind,
    Place,
    RunRecordKey,
    RunStatus,
)
from preemptible.core.shared import check_run_dir_shared
from preemptible.core.signals import SignalRecorder
from preemptible.core.store import StoredCheckpoint

log = logging.getLogger(__name__)

#: The exceptions a session raises to leave on purpose (the process exits with their code).
LEAVING = (Preempted, RequeueLimitReached, RequeueError)


class PreemptionSession:
    """One process's part of a preemptible run. Every rank has one and calls it at the same points.

    Args:
        config: the settings (:class:`~preemptible.core.config.SessionConfig`); keyword arguments
            build one when it is omitted.
        env: the scheduler's view of this process (read from the environment when omitted).

    Signals are recorded from construction on, so a SIGTERM during data preparation is acted on
    when training starts.
    """

    def __init__(self, config: Optional[SessionConfig] = None, env: Optional[JobEnvironment] = None,
                 **settings: Any) -> None:
        if config is not None and settings:
            raise TypeError(f"PreemptionSession: pass either a SessionConfig or settings, not both (got {sorted(settings)})")
        self.config = config if config is not None else SessionConfig(**settings)
        self.env = env or JobEnvironment.from_env()
        self.signals = SignalRecorder(self.config.signals)
        self.backend = select_backend(self.config.requeue, self.env)
        self.policy = StopPolicy(self.config.every_n_steps, self.config.every_n_minutes,
                                 deadline_from_setting(self.config.deadline, self.env))
        self.background = BackgroundWriter(on_failure=self._background_failed)
        self.agreement: StopAgreement = StopAgreement()
        self.pending = PendingStop()
        self.resumed_from: Optional[Path] = None
        self.rank, self.world_size = 0, 1
        self._run: Optional[RunDirectory] = None
        self._lock: Optional[RunLock] = None
        self._progress: Optional[ProgressFile] = None
        self._loaded: Optional[Path] = None
        self._start_step = self._last_step = -1
        self._last_progress_event = time.monotonic()
        self._signal_logged = False
        #: why the agreed stop happened and whether the run comes back (decided once, at the stop)
        self.stop_verdict: Optional[stop_cause.StopVerdict] = None
        self._faults: Optional[FaultPlan] = None  # testing faults (PREEMPTIBLE_INJECT); None: one cheap check per step
        #: Called (on the watchdog's thread) right before a rank leaves because a peer was lost; an adapter
        #: adds what must happen first (the Lightning one stops its launcher from killing this process).
        self.on_peer_lost: list[Callable[[], None]] = []
        self.peers = PeerGuard(self.env, self.on_peer_lost, last_step=lambda: self._last_step)  # core/peers.py
        self._owed: Optional[Snapshot] = None  # the state from the start of the validation under way
        self.active = False
        self.signals.install()

    # -- the run directory -------------------------------------------------------------------------
    @property
    def run(self) -> RunDirectory:
        if self._run is None:
            run = RunDirectory(resolve_run_dir(self.config.run_dir, self.env), keep=self.config.keep,
                               env=self.env, checksum=self.config.checksum)
            run.check_usable()  # a file, unwritable, read-only: said now, with the fix, before anything is written
            self._run = run
        return self._run

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def resume_path(self) -> Optional[str]:
        """The newest committed, valid checkpoint of this run, or ``None`` for a fresh start.

        Invalid checkpoints are reported and moved to ``checkpoints/quarantine/`` by global rank 0
        only; the previous valid one is returned. Call it on every rank: all get the same answer.
        Only global rank 0 reads the file to validate it; the others take its verdict.
        """
        run, checksum = self.run, self.config.verify == "checksum"
        if self.env.is_global_zero:
            run.store.clean_stale_temps()
            run.store.quarantine_orphans()
            found = resume_verdict.validate_as_rank_zero(run.store, run.path, self.env, checksum)
        else:  # rank 0 reads the file once for all (core/verdict.py): resume cost does not grow with the ranks
            found = resume_verdict.wait_for_rank_zero(run.store, run.path, self.env, checksum)
        self.resumed_from = found.path if found else None
        return str(found.path) if found else None

    # -- set-up ------------------------------------------------------------------------------------
    def open(self, rank: int, world_size: int) -> None:
        """Every rank, once the process group exists: the agreement and the run lock (rank 0 takes it)."""
        self.active = True
        self.rank, self.world_size = rank, world_size
        self.policy.is_global_zero = self.is_global_zero
        self.run.journal.rank = rank
        self.agreement = make_agreement(world_size, every=self.config.agree_every_n_steps)
        self._take_lock()
        if world_size > 1:
            procgroup.release_at_exit()  # else the gloo group may abort the finished process at exit (exit 134)
            token = check_run_dir_shared(self.run.path, self.agreement, rank)  # before any training
            self.peers.start(self.run, rank, world_size, token, timeout=float(self.config.peer_timeout or 0.0))
        self._faults = FaultPlan(parse_faults(self.env.inject), rank, self.env.restart_count) or None
        self.signals.install()

    def start(self, checkpoint: Optional[str | Path]) -> None:
        """Every rank, after the adapter's own checks: journal the start (or resume) and count the attempt."""
        run = self.run
        if self.world_size > 1:
            resume_verdict.check_same_resume(self.agreement, Path(checkpoint) if checkpoint else None)
        self._progress = ProgressFile(run.path / "progress.json", interval=self.env.progress_interval)
        self.policy.save_seconds = last_save_seconds(run.store)
        if self.is_global_zero:
            run.store.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            warn_if_lead_too_short(self.env.signal_lead, self.policy.save_seconds)
            warn_if_agent_drops_signals(self.env, self.signals.signals)
            run.journal.append(Event.RESUME if checkpoint else Event.START, checkpoint=str(checkpoint) if checkpoint else None,
                               world_size=self.world_size, attempt=self.env.restart_count, backend=self.backend.name,
                               process_started=_process_started())
            run.update_record(**{RunRecordKey.WORLD_SIZE: self.world_size, RunRecordKey.STATUS: RunStatus.RUNNING,
                                 RunRecordKey.MAX_CRASH_REQUEUES: self.config.max_crash_requeues,
                                 RunRecordKey.ATTEMPTS: int(run.read_record().get(RunRecordKey.ATTEMPTS, 0)) + 1})

    def training_started(self, step: int, epoch: int, loaded: Optional[str | Path]) -> bool:
        """Every rank, before the first step: a signal that came during set-up stops the run here.

        ``loaded`` is the checkpoint the trainer actually restored. Returns whether the run is
        stopping (then call :meth:`leave`): a blocking agreement, once per attempt, so all ranks leave together.
        """
        self.signals.install()
        self._loaded = Path(loaded) if loaded else None
        self._last_step = self._start_step = step
        if self.is_global_zero:
            self.run.journal.append(Event.TRAIN_START, step=step, epoch=epoch)
            assert self._progress is not None
            self._progress.report(step, epoch, force=True)
        if self.stopping:  # already stopped in the sanity check
            return True
        return self._stop_before_training(step, Place.BEFORE_TRAINING)

    # -- during training -----------------------------------------------------------------------------
    def boundary(self, step: int, epoch: int, snapshot: Snapshot, *, epoch_ends: bool = False,
                 validation_due: Callable[[], bool] = lambda: False) -> None:
        """Every rank, after each batch: at an optimizer-step boundary, vote, agree, and act on the decision.

        Args:
            step: the global step (the number of optimizer steps so far). A batch that leaves it
                unchanged is inside a gradient-accumulation window: never a stop there.
            epoch_ends: this batch is the epoch's last; an agreed stop then waits for the next
                boundary (some trainers cannot resume a checkpoint taken there exactly).
            validation_due: asked only once a stop is agreed: whether the trainer validates right
                after this batch; the stop then waits for :meth:`validation_ended`, as the
                uninterrupted run would have validated first.
        """
        if step == self._last_step:
            return
        self._last_step = step
        now = self.policy.note_boundary()
        waited = self.pending.take(Wait.NEXT_BOUNDARY)
        decided = waited or self.agreement.step(self._vote(step))
        if self.is_global_zero:
            # After this boundary's vote: a signal sent on seeing step N in progress.json is looked at from
            # step N + 1 on, never sometimes at N (the simulator and the tests preempt "at step N" by it).
            self._report_progress(step, epoch, now)
        if self._faults is not None:
            self._inject(step)
        if waited:
            self._act(decided, snapshot, step, epoch)
        elif not decided:
            return
        elif votes.is_stop(decided) and validation_due():
            # Taken when that validation starts, owing it: the resumed run validates first, as this one would have.
            self.pending.defer(decided, Wait.VALIDATION_START)
        elif epoch_ends:
            self.pending.defer(decided, Wait.NEXT_BOUNDARY)
        elif validation_due():
            self.pending.defer(decided, Wait.VALIDATION_END)
        else:
            self._act(decided, snapshot, step, epoch)

    # -- validation inside training, and the sanity check ---------------------------------------------
    def validation_started(self, step: int, epoch: int, owed: Optional[Snapshot], redone: bool = False) -> None:
        """Every rank, when a validation inside training begins (not the sanity check).

        ``owed`` dumps the training state as it was when this validation started, marked so that the
        resumed run runs this validation again from its first batch (the adapter builds it; weights
        and optimizer do not change during validation, so only the loop's progress and every rank's
        small state need capturing). A stop taken before the validation ends writes it, so no stop
        waits for a validation to finish. ``None``: the trainer cannot do that; a stop then waits for
        the validation's end (:meth:`validation_ended`).
        """
        self._owed = owed
        if redone and self.is_global_zero:  # ``redone``: the validation a checkpoint owed, run again by this attempt
            self.run.journal.append(Event.VALIDATION_REDONE, step=step)
        decided = self.pending.take(Wait.VALIDATION_START)
        if decided and owed is not None:
            self._emergency(decided, owed, step, epoch, place=Place.VALIDATION, batch=0, owes_validation=True)
        elif decided:
            self.pending.defer(decided, Wait.VALIDATION_END)

    def validation_batch_end(self, step: int, epoch: int, batch: int, sanity_check: bool = False) -> bool:
        """Every rank, after each validation batch (``batch``: its index), the sanity check's included.

        A blocking agreement (the ranks meet here anyway: every rank runs the same validation
        batches), so a signal to any rank stops all of them at the same validation batch. Inside
        training the state from the validation's start is saved; in the sanity check nothing was
        trained, so nothing is saved. Returns whether the run is stopping (then call :meth:`leave`).
        """
        if not self.pending.idle:  # stopped already, or a stop waits for the end of this validation
            return self.stopping
        if sanity_check:
            return self._stop_before_training(step, Place.SANITY_CHECK, batch)
        decided = self.agreement.now(self._stop_vote(step, Place.VALIDATION, batch))
        if not votes.is_stop(decided):
            return False
        if self._owed is not None:
            self._emergency(decided, self._owed, step, epoch, place=Place.VALIDATION, batch=batch, owes_validation=True)
        else:
            self.pending.defer(decided, Wait.VALIDATION_END)
        return self.stopping

    def validation_ended(self, step: int, epoch: int, snapshot: Snapshot) -> bool:
        """Every rank, after a validation inside training: act on a stop that waited for it, or on a signal that
        came during the validation's end-of-epoch work. Returns whether to leave now: the stop owes this
        validation (otherwise the adapter leaves at its next training batch, letting others finish the validation)."""
        owed, self._owed = self._owed, None
        decided = self.pending.take(Wait.VALIDATION_END)
        if decided:
            self._act(decided, snapshot, step, epoch)
        elif self.pending.idle:
            decided = self.agreement.now(self._stop_vote(step, Place.VALIDATION_END))
            if votes.is_stop(decided):
                # The state from the validation's start, owing it, rather than the one after it: a checkpoint
                # taken after an epoch's last validation is not resumed exactly by every trainer.
                self._emergency(decided, owed or snapshot, step, epoch, place=Place.VALIDATION_END,
                                owes_validation=owed is not None)
        return self.pending.stop is not None and self.pending.stop.owes_validation

    def epoch_started(self, step: int, epoch: int) -> bool:
        """Every rank, when an epoch begins, before its data loaders start (and their workers): a stop agreed here
        waits for the epoch's first boundary (the data position is the previous epoch's end), but the vote is
        cast now, so the ranks agree during the loader start-up instead of one step later."""
        if not self.pending.idle:
            return self.stopping
        decided = self.agreement.now(self._stop_vote(step, Place.EPOCH_START))
        if votes.is_stop(decided):
            self.pending.defer(decided, Wait.NEXT_BOUNDARY)
        return False

    @property
    def stopping(self) -> bool:
        """Whether the stop was taken and the ranks should leave (call :meth:`leave`)."""
        return self.pending.stop is not None

    def leave_if_stopped(self, before_exit: Callable[[], None] = lambda: None) -> None:
        if self.stopping:
            self.leave(before_exit)

    def leave(self, before_exit: Callable[[], None] = lambda: None) -> None:
        """Ask for the requeue (rank 0) and leave on every rank: raises :class:`Preempted` (or a limit/requeue error),
        or :class:`~preemptible.core.exit.Cancelled` without a requeue when the stop's cause was a cancellation
        (:mod:`preemptible.core.leaving`).

        ``before_exit`` runs right before the exception (the Lightning adapter lets the rank
        processes it launched exit first).
        """
        stop = self.pending.stop
        assert stop is not None, "leave() without a stop"
        leaving.leave(stop, self.stop_verdict, run=self.run, backend=self.backend, env=self.env, rank=self.rank,
                      max_requeues=self.config.max_requeues, before_exit=before_exit)

    def _decide_cause(self, step: int, reason: str) -> None:
        self.stop_verdict = leaving.decide_cause(self.run, self.env, self.agreement, self.signals, self.rank, step, reason)

    # -- the end ---------------------------------------------------------------------------------------
    def training_ended(self, step: int, epoch: int, snapshot: Snapshot) -> None:
        """Every rank, when the loop ran to its end: the final checkpoint (``save_on_finish``)."""
        if self.pending.stop is not None:
            if self.is_global_zero:
                # Training reached its end right after the emergency checkpoint: nothing left to requeue for.
                self.run.journal.append(Event.STOP_CANCELLED, step=step, reason="training finished")
        elif self.config.save_on_finish and step != self._start_step:
            self.background.wait()
            self._save(snapshot, step, epoch, reason=REASON_FINISHED)
        self.pending.clear()

    def finished(self, step: int) -> None:
        """Global rank 0 records that the run finished (other ranks: nothing)."""
        if self.is_global_zero and self._run is not None:
            self._run.journal.append(Event.FINISH, step=step)
            self._run.update_record(**{RunRecordKey.STATUS: RunStatus.FINISHED, RunRecordKey.FINISHED_STEP: step})

    def abandon(self, exception: BaseException) -> dict[int, Any]:
        """Training ended with ``exception``: release the lock; returns the handlers to keep in place from here on.

        After our own exit (:data:`LEAVING`) the preemption signals are ignored until the process is
        gone (SLURM follows a requeue with SIGTERM to every task; a late one must not turn a clean
        exit with the requeue code into a death by signal). After any other error the handlers from
        before the session are put back.
        """
        self.active = False
        if self._lock is not None:
            self._lock.release()
        if not isinstance(exception, LEAVING):
            procgroup.keep_at_exit()  # a collective may still wait for a peer that is gone
        self.peers.after(exception, left_on_purpose=isinstance(exception, LEAVING))
        if isinstance(exception, LEAVING):
            self.signals.ignore_from_now_on()
            return dict.fromkeys(self.signals.signals, signal.SIG_IGN)
        # Journaled before the process exits, so that its supervisor can tell this failure (final: the
        # training code would raise again) from a crash that leaves no trace (core/crashes.py).
        self._journal_failure(exception)
        handlers = self.signals.previous_handlers()
        self.signals.restore()
        return handlers

    def end(self) -> None:
        """Every rank, last: let a background write land, close the agreement, restore handlers, unlock; then
        report a background write that failed (last, so that a warning turned into an error skips nothing)."""
        self.active = False
        self.background.wait()
        self.peers.stop()  # the watchdog, and the in-rank crash supervisor it registered
        self.agreement.close()
        self.signals.restore()
        if self._lock is not None:
            self._lock.release()
        self._report_background_failure()

    def release_process_group(self) -> bool:
        """Every rank, once no collective follows: destroy the ``torch.distributed`` groups now.

        Otherwise this happens at interpreter exit (registered by :meth:`open` under DDP), which is
        early enough against the gloo abort at exit; an adapter that owns the group's life (a Fabric
        or plain-loop script) may call this at its end instead. Returns whether there was a group.
        """
        return procgroup.release_process_groups()

    # -- faults on purpose (core/inject.py); crashes without warning: core/peers.py ------------------------
    def _inject(self, step: int) -> None:
        assert self._faults is not None
        fault = self._faults.due(step)
        if fault is not None:
            self.run.journal.append(Event.FAULT_INJECTED, action=fault.action, step=step)
            fire(fault)

    # -- internals -------------------------------------------------------------------------------------
    def _journal_failure(self, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) or self._run is None:
            return
        kind = failure_kind(exception)
        try:
            self._run.journal.append(Event.FAILURE, step=self._last_step, kind=kind,
                                     error=f"{type(exception).__name__}: {exception}"[:500])
            if self.is_global_zero and kind == FailureKind.USER:
                self._run.update_record(**{RunRecordKey.STATUS: RunStatus.FAILED})
        except OSError as exc:  # the original error matters more than its journal line
            log.warning("preemptible: could not journal the failure: %s", exc)

    def _journal_signal(self, step: int, place: str = Place.TRAINING, batch: Optional[int] = None) -> None:
        """Every rank that received a signal journals it once, at the first point it looks (never in the handler)."""
        note = self.signals.note
        if note is not None and not self._signal_logged:
            self._signal_logged = True
            self.run.journal.append(Event.SIGNAL, signal=note.name, count=note.count, received_at=note.first_at, step=step,
                                    place=place, batch=step if place == Place.TRAINING else batch)

    def _stop_before_training(self, step: int, place: str, batch: Optional[int] = None) -> bool:
        """A blocking agreement before this attempt's first step: a stop there has nothing new to save."""
        note = self.signals.note
        self._journal_signal(step, place, batch)
        over_limit = self._over_requeue_limit()  # read before the agreement: rank 0 updates the record after it
        decided = self.agreement.now(votes.for_signal(note.signum) if note else votes.NOTHING)
        if not votes.is_stop(decided):
            return False
        self.pending.stopped(Stopped(step=step, reason=votes.reason(decided), checkpoint=self.resumed_from,
                                     over_limit=over_limit))
        if self.is_global_zero:
            self.run.journal.append(Event.STOP_AGREED, step=step, reason=votes.reason(decided), place=place, batch=batch)
        self._decide_cause(step, votes.reason(decided))
        return True

    def _stop_vote(self, step: int, place: str, batch: Optional[int] = None) -> int:
        """This rank's vote outside an optimizer-step boundary: a signal or the deadline (never a periodic save)."""
        vote = self._vote(step, place, batch)
        return vote if votes.is_stop(vote) else votes.NOTHING

    def _vote(self, step: int, place: str = Place.TRAINING, batch: Optional[int] = None) -> int:
        self._journal_signal(step, place, batch)
        vote = self.policy.vote(step, self.signals.note)  # the recorder's plain attributes: no lock, cheap
        if vote == votes.DEADLINE:
            deadline = self.policy.deadline
            left = deadline.seconds_left() if deadline is not None else None
            self.run.journal.append(Event.DEADLINE, step=step, seconds_left=round(left or 0.0, 1),
                                    needed=round(self.policy.seconds_needed_to_stop(), 1))
        return vote

    def _report_progress(self, step: int, epoch: int, now: float) -> None:
        assert self._progress is not None
        if self._progress.report(step, epoch) and self._lock is not None:
            self._lock.heartbeat()
        if now - self._last_progress_event >= self.env.progress_event_seconds:
            # A sparse (time, step) series in the journal, for timelines and goodput reports.
            self._last_progress_event = now
            self.run.journal.append(Event.PROGRESS, step=step, epoch=epoch)

    def _act(self, decided: int, snapshot: Snapshot, step: int, epoch: int) -> None:
        if votes.is_stop(decided):
            self._emergency(decided, snapshot, step, epoch)
        elif decided == votes.PERIODIC_SAVE:
            self._periodic(snapshot, step, epoch)

    def _periodic(self, snapshot: Snapshot, step: int, epoch: int) -> None:
        self.policy.note_save()
        # Only rank 0 writes in the background, so only it knows that its last write is still in flight;
        # the save is a collective, so every rank must make the same choice.
        if self.agreement.any(self.background.busy):
            if self.is_global_zero:
                log.warning("preemptible: the previous periodic checkpoint is still being written; skipping this one")
                self.run.journal.append(Event.CHECKPOINT_SKIPPED, step=step,
                                        reason="the previous background checkpoint is still being written")
            return
        self._save(snapshot, step, epoch, reason=REASON_PERIODIC, background=self.config.async_save)

    def _emergency(self, decided: int, snapshot: Snapshot, step: int, epoch: int, place: str = Place.TRAINING,
                   batch: Optional[int] = None, owes_validation: bool = False) -> None:
        """Every rank, same step: write the emergency checkpoint; the adapter leaves at its next safe point.

        ``owes_validation``: ``snapshot`` holds the state from the start of the validation under way."""
        reason = votes.reason(decided)
        self.background.wait()
        # Every rank reads the requeue count before the save's collectives; rank 0 updates it only after them.
        over_limit = self._over_requeue_limit()
        if self.is_global_zero:
            self.run.journal.append(Event.STOP_AGREED, step=step, reason=reason, place=place,
                                    batch=step if place == Place.TRAINING else batch)
        path = self.resumed_from
        if not self._nothing_new_since_resume(step):
            note = self.signals.note
            stored = self._save(snapshot, step, epoch, reason=reason, signal_at=note.first_at if note else None)
            path = stored.path if stored else None
            if stored is not None and stored.record.save_seconds:
                self.policy.save_seconds = stored.record.save_seconds
            if owes_validation and self.is_global_zero:
                self.run.journal.append(Event.VALIDATION_OWED, step=step, batch=batch, path=str(path) if path else None)
        self._decide_cause(step, reason)
        self.pending.stopped(Stopped(step=step, reason=reason, checkpoint=path, over_limit=over_limit,
                                     owes_validation=owes_validation))

    def _save(self, snapshot: Snapshot, step: int, epoch: int, reason: str, signal_at: Optional[float] = None,
              background: bool = False) -> Optional[StoredCheckpoint]:
        """Every rank, same step: one checkpoint through the store (never pruning the one resumed from).

        A background write that failed since the last save is reported after this one, outside its
        collectives (a warning turned into an error on rank 0 must not leave the other ranks waiting).
        """
        stored = save_checkpoint(self.run, self.agreement, snapshot, step=step, epoch=epoch, reason=reason,
                                 world_size=self.world_size, is_global_zero=self.is_global_zero,
                                 protect={self.resumed_from}, signal_at=signal_at,
                                 background=self.background if background else None)
        self._report_background_failure()
        return stored

    def _background_failed(self, exc: BaseException, step: int) -> None:
        # On the writer thread: journal it now, so that `preemptible status` shows it even if the process dies.
        self.run.journal.append(Event.CHECKPOINT_FAILED, step=step, reason=REASON_PERIODIC, error=str(exc))

    def _report_background_failure(self) -> None:
        failure = self.background.take_failure()
        if failure is not None:
            warnings.warn(f"preemptible: {failure}", stacklevel=3)

    def _take_lock(self) -> None:
        """Global rank 0 takes the run directory's lock; every rank learns the outcome (no rank hangs)."""
        error = None
        if self.is_global_zero:
            self.run.create()
            self._lock = RunLock(self.run.path, job_id=self.env.job_id)
            try:
                taken_over = self._lock.acquire()
                if taken_over and taken_over != "held by this process":
                    log.info("preemptible: took over the run directory's lock: %s", taken_over)
            except RunLockedError as exc:
                self._lock, error = None, str(exc)
        error = self.agreement.broadcast(error)
        if error is not None:
            raise RunLockedError(error)

    def _over_requeue_limit(self) -> bool:
        return self.run.requeues_so_far() >= self.config.requeue_limit

    def _nothing_new_since_resume(self, step: int) -> bool:
        # Stopped again before any step after resuming: the checkpoint we resumed from *is* the state.
        return (self.resumed_from is not None and self._loaded is not None
                and self._loaded.resolve() == self.resumed_from.resolve() and step == self._start_step)



def _process_started() -> Optional[float]:
    """This process's start time (unix seconds) by the operating system: start-up is told from there, not
    from the trainer's set-up, so interpreter, imports and launch are not counted as queue wait."""
    try:
        import psutil

        return round(float(psutil.Process().create_time()), 3)
    except Exception:  # noqa: BLE001 - a figure for reports only
        return None
