"""``PreemptionCallback``: signal → agreed step → emergency checkpoint → requeue → exact resume."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from preemptible.core.agreement import StopAgreement, make_agreement
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import Preempted, RequeueLimitReached
from preemptible.lightning import hooks
from preemptible.lightning.compat import check_checkpoint_fits
from preemptible.lightning.loaders import LoaderTracker
from preemptible.lightning.loggers import export_wandb_run_id, keep_logger_versions
from preemptible.core import votes
from preemptible.core.deadline import JobDeadline
from preemptible.lightning.saving import BackgroundWriter, save_checkpoint, warn_if_short_of_space
from preemptible.core.lock import RunLock, RunLockedError
from preemptible.core.requeue import RequeueBackend, RequeueError, select_backend
from preemptible.core.rng import capture_rng
from preemptible.core.rundir import ProgressFile, RunDirectory, RunDirError, resolve_run_dir
from preemptible.core.signals import DEFAULT_SIGNALS, SignalRecorder
from preemptible.core.store import CHECKSUMS, StoredCheckpoint

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEUES = 50
_PROGRESS_EVENT_SECONDS = float(os.environ.get("PREEMPTIBLE_PROGRESS_EVENT_SECONDS", "30"))
_STATE_FORMAT = 1


class PreemptionCallback(Callback):
    r"""Survive preemption: checkpoint on a signal at a step all ranks agree on, requeue, resume exactly.

    A signal (``SIGUSR1`` from ``sbatch --signal``, ``SIGTERM`` on preemption or requeue,
    ``SIGUSR2`` under submitit) is only *recorded* by the handler. At the next optimizer-step
    boundary the ranks agree to stop at the same global step, write an emergency checkpoint
    atomically into ``<run_dir>/checkpoints/``, ask for a requeue (rank 0), and leave
    ``trainer.fit`` by raising :class:`~preemptible.Preempted` (exit code
    :data:`~preemptible.REQUEUE_EXIT_CODE`) on every rank. The restarted job calls
    :meth:`resume_path` and continues from the same global step with the same data order and
    random streams.

    Args:
        run_dir: the run's directory, identical for every restart. Default: ``$PREEMPTIBLE_RUN_DIR``,
            else ``runs/<SLURM_JOB_ID>`` under SLURM, else an error.
        signals: signals that mean "stop soon" (names like ``"USR1"`` or ``signal.Signals``).
        requeue: ``"auto"`` (SLURM → ``scontrol requeue``; submitit → submitit; else exit code only),
            ``"slurm"``, ``"submitit"``, ``"local"``, ``"none"``, or a
            :class:`~preemptible.core.requeue.RequeueBackend`.
        max_requeues: how many requeues the run may use (counted from ``SLURM_RESTART_COUNT`` and the
            run's own record). Past it the checkpoint is still written, the process exits with code 1
            and a message saying so. Default: ``$PREEMPTIBLE_MAX_REQUEUES``, else 50.
        keep: committed checkpoints to keep (at least 2; never the one the run resumed from).
        verify: ``"checksum"`` (default) checks size and checksum of a checkpoint before resuming from it,
            ``"size"`` only its size (``"sha256"``, the name of 0.1.0, means ``"checksum"``).
        checksum: how new checkpoints are checksummed: ``"crc32"`` (default; detects accidental
            damage, 2-3x faster than sha256 to write and to check) or ``"sha256"``.
        exact_data: make map-style training ``DataLoader``\ s resume mid-epoch at the exact batch with
            the same shuffle and augmentation randomness (see the README's "What is exact").
        save_on_finish: commit a last checkpoint when training ends, so that a finished run that is
            started again (a late requeue, an operator's resubmission) resumes at its end instead of redoing work.
        allow_world_size_change: resume a checkpoint written by a different number of ranks (the
            continuation is then not exact); by default that is an error naming both numbers.
        every_n_steps, every_n_minutes: periodic safety checkpoints (against crashes and SIGKILL without
            warning) through the same atomic store and retention. The time-based one follows rank 0's clock.
        async_save: write periodic checkpoints on a background thread from a CPU copy of the state,
            so training waits only for the copy, not for the disk. The copy's buffers are kept and
            reused from one save to the next: one checkpoint's worth of CPU memory.
        deadline: ``True`` reads the job's end time from SLURM (``squeue``) and checkpoints and requeues
            proactively when the time left would no longer fit an emergency save; a number is a fixed
            end time (unix seconds); ``False`` turns it off.
        agree_every_n_steps: under DDP, reduce the ranks' stop votes only every N optimizer steps.
            While SIGTERM is among ``signals`` the reduction runs in the slot of Lightning's own
            per-batch SIGTERM broadcast, which it replaces, so it adds no collective; raising N
            removes even that one from most batches (the stop then comes up to 2 N steps after
            the signal instead of 1-2), which shows only on steps of a few milliseconds.

    Example::

        import pytorch_lightning as pl
        from preemptible import PreemptionCallback

        cb = PreemptionCallback(run_dir="runs/exp1")
        trainer = pl.Trainer(max_epochs=3, callbacks=[cb])
        trainer.fit(model, datamodule=dm, ckpt_path=cb.resume_path())  # None on the first start

    .. note:: Lightning's own SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``, on by default)
       is switched off for this trainer: it would checkpoint inside the signal handler and keep
       training. Exactly one party handles the signal.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        signals: Iterable[str | int | signal.Signals] = DEFAULT_SIGNALS,
        requeue: str | RequeueBackend = "auto",
        max_requeues: Optional[int] = None,
        keep: int = 2,
        verify: str = "checksum",
        checksum: str = "crc32",
        exact_data: bool = True,
        save_on_finish: bool = True,
        allow_world_size_change: bool = False,
        every_n_steps: Optional[int] = None,
        every_n_minutes: Optional[float] = None,
        async_save: bool = True,
        deadline: bool | float | None = True,
        agree_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if verify not in ("checksum", "sha256", "size"):
            raise ValueError(f"verify={verify!r}: use 'checksum' (size and checksum) or 'size'")
        if checksum not in CHECKSUMS:
            raise ValueError(f"checksum={checksum!r}: use one of {sorted(CHECKSUMS)}")
        if max_requeues is None:
            max_requeues = int(os.environ.get("PREEMPTIBLE_MAX_REQUEUES", DEFAULT_MAX_REQUEUES))
        if max_requeues < 0:
            raise ValueError(f"max_requeues={max_requeues} must be >= 0")
        self._run_dir_arg = run_dir
        self.signals = SignalRecorder(signals)
        self.requeue = requeue
        self.max_requeues = max_requeues
        self.keep = keep
        self.verify = "checksum" if verify == "sha256" else verify
        self.checksum = checksum
        self.exact_data = exact_data
        self.save_on_finish = save_on_finish
        self.allow_world_size_change = allow_world_size_change
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1 (or None)")
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise ValueError(f"every_n_minutes={every_n_minutes} must be > 0 (or None)")
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.async_save = async_save
        if agree_every_n_steps < 1:
            raise ValueError(f"agree_every_n_steps={agree_every_n_steps} must be >= 1")
        self.agree_every_n_steps = agree_every_n_steps
        self.env = JobEnvironment.from_env()
        if deadline is True:
            self._deadline: JobDeadline | None = JobDeadline(self.env)
        elif deadline in (False, None):
            self._deadline = None
        else:
            self._deadline = JobDeadline(self.env, end_time=float(deadline))
        self._background = BackgroundWriter()
        self._last_save_time = time.monotonic()
        self._save_seconds: float | None = None
        self._step_seconds = 0.0
        self._last_boundary_time = time.monotonic()
        select_backend(requeue, self.env)  # fail early on a bad name

        self._run: RunDirectory | None = None
        self._resumed_from: Path | None = None
        self._agreement: StopAgreement = StopAgreement()
        self._loaders = LoaderTracker(enabled=exact_data)
        self._loaded_rank_state: dict[str, Any] | None = None
        self._gathered_rank_states: list[dict[str, Any]] | None = None
        self._last_step = -1
        self._last_progress_event = time.monotonic()
        self._start_step = -1
        self._stop_after_validation: int = 0
        self._stop_at_next_boundary: int = 0
        self._stop: _Stop | None = None
        self._signal_logged = False
        self._fitting = False
        self._lock: RunLock | None = None
        # Record from construction on: a SIGTERM during data preparation is acted on when training starts.
        self.signals.install()
        if "wandb" in sys.modules or importlib.util.find_spec("wandb") is not None:
            try:
                export_wandb_run_id(self._rundir())
            except RunDirError:
                pass  # reported, with the fix, when training starts

    # ------------------------------------------------------------------------------------------------
    # Public helpers
    # ------------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return "PreemptionCallback"

    @property
    def run_dir(self) -> Path:
        return self._rundir().path

    def resume_path(self) -> str | None:
        """The newest committed, valid checkpoint of this run, or ``None`` for a fresh start.

        Invalid checkpoints (size or checksum mismatch, damaged commit record) are reported with a
        warning and moved to ``checkpoints/quarantine/`` (by global rank 0 only), and the previous
        valid one is returned. Call it on every rank; all ranks get the same answer.
        """
        run = self._rundir()
        is_rank_zero = self.env.global_rank == 0 and os.environ.get("LOCAL_RANK", "0") == "0"
        if is_rank_zero:
            run.store.clean_stale_temps()
            run.store.quarantine_orphans()
        found = run.store.latest_valid(checksum=self.verify == "checksum", quarantine=is_rank_zero)
        self._resumed_from = found.path if found else None
        return str(found.path) if found else None

    # ------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._fitting = True
        run = self._rundir()
        run.journal.rank = trainer.global_rank
        self._take_lock(trainer, run)
        # Lightning only learns ckpt_path after this hook; the canonical call passes resume_path()'s answer.
        ckpt = trainer.ckpt_path or self._resumed_from
        if ckpt:
            check_checkpoint_fits(ckpt, pl_module, trainer.world_size, self.allow_world_size_change)
        if trainer.is_global_zero:
            warn_if_short_of_space(run.store, pl_module)
        keep_logger_versions(trainer, run)
        self.signals.install()
        if not self.signals.installed:
            warnings.warn("preemptible: trainer.fit is not running in the main thread, so no signal handler "
                          "could be installed; preemption signals will not be noticed", stacklevel=2)
        if hooks.disable_lightning_auto_requeue(trainer):
            log.info("preemptible: Lightning's SLURM auto-requeue disabled; preemptible handles the signal")
        hooks.after_lightning_installs_handlers(trainer, self.signals.install)
        if self.exact_data:
            if not hooks.intercept_train_loader_setup(trainer, self._loaders.prepare, self._loaders.after_lightning_load):
                warnings.warn("preemptible: this Lightning version offers no point to prepare train loaders; "
                              "mid-epoch resume will replay or skip batches", stacklevel=2)
        self._agreement = make_agreement(trainer.world_size, every=self.agree_every_n_steps)
        if signal.SIGTERM in self.signals.signals and self.signals.installed:
            # Ours is then the only SIGTERM handler on every rank: Lightning's per-batch broadcast of its
            # own SIGTERM flag could only carry 0. Our votes are reduced in its slot instead (one blocking
            # collective per batch either way); otherwise they go in a reduction of their own.
            self._agreement.deferred = hooks.replace_lightning_sigterm_broadcast(trainer, self._agreement.reduce_pending)
        self._backend = select_backend(self.requeue, self.env)
        self._progress = ProgressFile(run.path / "progress.json")
        self._save_seconds = _last_save_seconds(run)
        if trainer.is_global_zero:
            _warn_if_lead_too_short(self._save_seconds)
            event = "resume" if ckpt else "start"
            run.journal.append(event, checkpoint=str(ckpt) if ckpt else None, world_size=trainer.world_size,
                               attempt=self.env.restart_count, backend=self._backend.name)
            run.update_record(world_size=trainer.world_size, status="running",
                              attempts=int(run.read_record().get("attempts", 0)) + 1)

    def _previous_handlers(self) -> dict[int, Any]:
        return {s: self.signals.previous_handler(s) or signal.SIG_DFL for s in self.signals.signals}

    def on_sanity_check_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.signals.install()

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.signals.install()
        self._loaders.at_train_start()
        self._last_step = self._start_step = trainer.global_step
        if trainer.is_global_zero:
            self._rundir().journal.append("train_start", step=trainer.global_step, epoch=trainer.current_epoch)
            self._progress.report(trainer.global_step, trainer.current_epoch, force=True)
        # A signal that came before the first step (during set-up or the sanity check): stop now.
        # This is a blocking agreement, once per fit, so every rank leaves together.
        note = self.signals.note
        over_limit = self._over_requeue_limit()  # read before the agreement: rank 0 updates the record after it
        decided = self._agreement.now(votes.for_signal(note.signum) if note else votes.NOTHING)
        if votes.is_stop(decided):
            self._stop = _Stop(step=trainer.global_step, reason=votes.reason(decided), checkpoint=self._resumed_from,
                               over_limit=over_limit)
            if trainer.is_global_zero:
                self._rundir().journal.append("stop_agreed", step=trainer.global_step, reason=self._stop.reason)
            self._leave(trainer)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self._stop is not None:
            # The checkpoint was taken at the end of the previous batch; leaving only now lets every
            # other callback and the LightningModule finish that batch's hooks (logging, metrics).
            self._leave(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        self._loaders.note_trained(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        step = trainer.global_step
        if step == self._last_step:
            return  # inside a gradient-accumulation window: never stop here
        self._last_step = step
        now = time.monotonic()
        self._step_seconds, self._last_boundary_time = now - self._last_boundary_time, now
        if trainer.is_global_zero:
            if self._progress.report(step, trainer.current_epoch) and self._lock is not None:
                self._lock.heartbeat()
            if now - self._last_progress_event >= _PROGRESS_EVENT_SECONDS:
                # A sparse (time, step) series in the journal, for timelines and goodput reports.
                self._last_progress_event = now
                self._rundir().journal.append("progress", step=step, epoch=trainer.current_epoch)
        if self._stop_at_next_boundary:
            decided, self._stop_at_next_boundary = self._stop_at_next_boundary, 0
            self._act(trainer, decided)
            return
        decided = self._agreement.step(self._vote(trainer, step))
        if not decided:
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # Lightning (2.6) resumes a checkpoint taken on an epoch's last batch one epoch too far
            # (the next epoch is counted but never trained). Stop at the next step boundary instead:
            # one step later, after the epoch's end-of-epoch validation and hooks, like an uninterrupted run.
            self._stop_at_next_boundary = decided
            return
        if _validation_due(trainer):
            # The uninterrupted run validates right after this batch; do the same before saving, so
            # the resumed run neither skips that validation nor shifts the random stream.
            self._stop_after_validation = decided
            return
        self._act(trainer, decided)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._stop_after_validation and not trainer.sanity_checking:
            decided, self._stop_after_validation = self._stop_after_validation, 0
            self._act(trainer, decided)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._stop is not None:
            if trainer.is_global_zero:
                # Training reached its end right after the emergency checkpoint: nothing left to requeue for.
                self._rundir().journal.append("stop_cancelled", step=trainer.global_step, reason="training finished")
        elif self.save_on_finish and trainer.global_step != self._start_step:
            self._background.wait()
            self._save(trainer, reason="finished")
        self._stop = None

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.is_global_zero and self._run is not None:
            self._run.journal.append("finish", step=trainer.global_step)
            self._run.update_record(status="finished", finished_step=trainer.global_step)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._fitting = False
        if self._lock is not None:
            self._lock.release()
        if isinstance(exception, (Preempted, RequeueLimitReached, RequeueError)):
            # The process is on its way out, and SLURM follows a requeue with SIGTERM to every task:
            # ignore the preemption signals from here on (through Lightning's teardown and Python's own
            # shutdown, which resets Python-level handlers but not SIG_IGN), so that a late signal
            # cannot turn a clean exit with the requeue code into a death by signal.
            ignored = {s: signal.SIG_IGN for s in self.signals.signals}
            self.signals.ignore_from_now_on()
            hooks.keep_handlers_through_teardown(trainer, ignored)
            return
        # Any other error: Lightning's teardown, which comes next, must put back the handlers from before us.
        hooks.keep_handlers_through_teardown(trainer, self._previous_handlers())
        self.signals.restore()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or not self._fitting:
            return
        self._fitting = False
        self._background.wait()
        self._agreement.close()
        hooks.restore_lightning_sigterm_broadcast(trainer)
        self.signals.restore()
        if self._lock is not None:
            self._lock.release()

    # -- state carried inside the checkpoint ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        ranks = self._gathered_rank_states
        if ranks is None:
            # A save that is not ours (ModelCheckpoint, a user's trainer.save_checkpoint): no
            # collective is allowed here, so only this rank's state goes in.
            ranks = [self._rank_state(None)]
        return {"format": _STATE_FORMAT, "ranks": ranks, "gathered": self._gathered_rank_states is not None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        rank = _current_rank()
        if rank < len(ranks):
            self._loaded_rank_state = ranks[rank]
        elif ranks:
            warnings.warn(f"preemptible: the checkpoint holds the random state of {len(ranks)} rank(s), this is rank "
                          f"{rank}; its random streams start fresh and the continuation will not be bit-exact", stacklevel=2)
        self._loaders.set_resume(self._loaded_rank_state)

    # ------------------------------------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------------------------------------
    def _rundir(self) -> RunDirectory:
        if self._run is None:
            self._run = RunDirectory(resolve_run_dir(self._run_dir_arg, self.env), keep=self.keep, env=self.env,
                                     checksum=self.checksum)
        return self._run

    def _rank_state(self, trainer: Optional["pl.Trainer"]) -> dict[str, Any]:
        return {"rng": capture_rng(), "loaders": self._loaders.state(trainer)}

    def _vote(self, trainer: "pl.Trainer", step: int) -> int:
        """This rank's wish at this boundary (see :mod:`preemptible.core.votes`)."""
        note = self.signals.note
        if note is not None:
            if not self._signal_logged:
                self._signal_logged = True
                self._rundir().journal.append("signal", signal=note.name, count=note.count, received_at=note.first_at, step=step)
            return votes.for_signal(note.signum)
        if trainer.is_global_zero and self._deadline is not None and self._deadline.too_close(self._seconds_needed_to_stop()):
            left = self._deadline.seconds_left()
            self._rundir().journal.append("deadline", step=step, seconds_left=round(left or 0.0, 1),
                                          needed=round(self._seconds_needed_to_stop(), 1))
            return votes.DEADLINE
        if self.every_n_steps and step % self.every_n_steps == 0:
            return votes.PERIODIC_SAVE
        if (self.every_n_minutes and trainer.is_global_zero
                and time.monotonic() - self._last_save_time >= 60 * self.every_n_minutes):
            return votes.PERIODIC_SAVE
        return votes.NOTHING

    def _seconds_needed_to_stop(self) -> float:
        # Two steps (the agreement's latency), the save (as measured, doubled for safety), a margin for exit.
        save = self._save_seconds if self._save_seconds is not None else 10.0
        return 2 * self._step_seconds + 2 * save + 15.0

    def _act(self, trainer: "pl.Trainer", decided: int) -> None:
        if votes.is_stop(decided):
            self._checkpoint(trainer, decided)
        elif decided == votes.PERIODIC_SAVE:
            self._periodic_save(trainer)

    def _periodic_save(self, trainer: "pl.Trainer") -> None:
        self._last_save_time = time.monotonic()
        # Only rank 0 writes in the background, so only it knows that its last write is still in flight;
        # the save is a collective, so every rank must make the same choice.
        if self._agreement.any(self._background.busy):
            if trainer.is_global_zero:
                log.warning("preemptible: the previous periodic checkpoint is still being written; skipping this one")
                self._rundir().journal.append("checkpoint_skipped", step=trainer.global_step,
                                              reason="the previous background checkpoint is still being written")
            return
        self._save(trainer, reason="periodic", background=self._background if self.async_save else None)

    def _save(self, trainer: "pl.Trainer", reason: str, signal_at: float | None = None,
              background: BackgroundWriter | None = None) -> StoredCheckpoint | None:
        """Every rank, same step: one checkpoint through the store (never pruning the one resumed from)."""
        return save_checkpoint(
            trainer, self._rundir(), self._agreement, step=trainer.global_step, reason=reason,
            rank_state=self._rank_state(trainer), set_gathered=self._set_gathered,
            protect={self._resumed_from}, signal_at=signal_at, background=background,
        )

    def _checkpoint(self, trainer: "pl.Trainer", decided: int) -> None:
        """Every rank, same step: write the emergency checkpoint; leave at the next batch start."""
        run = self._rundir()
        reason = votes.reason(decided)
        self._background.wait()
        step = trainer.global_step
        # Every rank reads the requeue count before the save's collectives; rank 0 updates it only after them.
        over_limit = self._over_requeue_limit()
        if trainer.is_global_zero:
            run.journal.append("stop_agreed", step=step, reason=reason)
        path = self._resumed_from
        if not self._nothing_new_since_resume(trainer):
            note = self.signals.note
            stored = self._save(trainer, reason=reason, signal_at=note.first_at if note else None)
            path = stored.path if stored else None
            if stored is not None and stored.record.save_seconds:
                self._save_seconds = stored.record.save_seconds
        self._stop = _Stop(step=step, reason=reason, checkpoint=path, over_limit=over_limit)

    def _leave(self, trainer: "pl.Trainer") -> None:
        """Ask for the requeue (rank 0) and leave ``fit`` on every rank."""
        assert self._stop is not None
        stop, run = self._stop, self._rundir()
        step, path = stop.step, str(stop.checkpoint) if stop.checkpoint else None
        _flush_loggers(trainer)
        if stop.over_limit:
            # Every rank exits 1, so that no supervisor (srun takes the highest exit code) sees a requeue request.
            message = (f"preemptible: requeue limit reached ({self.max_requeues} requeues used). Not requeueing; "
                       f"the checkpoint at step {step} is kept ({path}). Resubmit by hand to continue, or raise "
                       "max_requeues / PREEMPTIBLE_MAX_REQUEUES.")
            if trainer.is_global_zero:
                run.journal.append("requeue", backend=self._backend.name, outcome="limit_reached", step=step)
                run.update_record(status="requeue_limit")
                print(message, flush=True)
            run.journal.append("exit", code=1, reason="requeue_limit", step=step)
            self._exit_after_children(trainer)
            raise RequeueLimitReached(message)
        if trainer.is_global_zero:
            try:
                outcome = self._backend.request(self.env)
            except RequeueError as exc:
                run.journal.append("requeue", backend=self._backend.name, outcome="failed", error=str(exc), step=step)
                run.update_record(status="requeue_failed")
                print(f"preemptible: {exc}", flush=True)
                self._exit_after_children(trainer)
                raise
            record = run.read_record()
            run.update_record(status="preempted", requeues=int(record.get("requeues", 0)) + int(outcome.requested),
                              last_preempted_step=step)
            run.journal.append("requeue", backend=outcome.backend, outcome="requested" if outcome.requested else "none",
                               detail=outcome.detail, step=step)
        exc = Preempted(step=step, checkpoint=path, reason=stop.reason)
        run.journal.append("exit", code=exc.code, reason=stop.reason, step=step)
        print(f"preemptible: rank {trainer.global_rank} {exc}", flush=True)
        self._exit_after_children(trainer)
        raise exc

    def _take_lock(self, trainer: "pl.Trainer", run: RunDirectory) -> None:
        """Global rank 0 takes the run directory's lock; every rank learns the outcome (no rank hangs)."""
        error = None
        if trainer.is_global_zero:
            run.create()
            self._lock = RunLock(run.path, job_id=self.env.job_id)
            try:
                taken_over = self._lock.acquire()
                if taken_over and taken_over != "held by this process":
                    log.info("preemptible: took over the run directory's lock: %s", taken_over)
            except RunLockedError as exc:
                self._lock, error = None, str(exc)
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise RunLockedError(error)

    def _over_requeue_limit(self) -> bool:
        return self._rundir().requeues_so_far() >= self.max_requeues

    def _exit_after_children(self, trainer: "pl.Trainer") -> None:
        children = hooks.lightning_spawned_children(trainer)
        if children:
            hooks.let_children_exit_first(children, timeout=120)

    def _set_gathered(self, states: Optional[list[dict[str, Any]]]) -> None:
        self._gathered_rank_states = states

    def _nothing_new_since_resume(self, trainer: "pl.Trainer") -> bool:
        # Stopped again before any step after resuming: the checkpoint we resumed from *is* the state.
        return (self._resumed_from is not None and trainer.ckpt_path is not None
                and Path(trainer.ckpt_path).resolve() == self._resumed_from.resolve()
                and trainer.global_step == self._start_step)


@dataclass(frozen=True)
class _Stop:
    step: int
    reason: str
    checkpoint: Path | None
    over_limit: bool = False


def _validation_due(trainer: "pl.Trainer") -> bool:
    epoch_loop = trainer.fit_loop.epoch_loop
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    check = getattr(epoch_loop, "_should_check_val_fx", None)
    if check is None or fetcher is None or not trainer.enable_validation:
        return False
    try:
        return bool(check(fetcher))
    except Exception:  # noqa: BLE001 - a private helper changed shape: save now rather than guess
        return False


def _flush_loggers(trainer: "pl.Trainer") -> None:
    """Write what the loggers still buffer (CSVLogger keeps up to 100 steps in memory), so no metric is lost."""
    for logger in trainer.loggers:
        try:
            logger.save()
            logger.finalize("preempted")
        except Exception as exc:  # noqa: BLE001 - a logger's trouble must not stop the exit path
            warnings.warn(f"preemptible: could not flush {type(logger).__name__} before exiting: {exc}", stacklevel=2)


def _last_save_seconds(run: RunDirectory) -> float | None:
    """How long the last committed checkpoint of this run took to write (from its commit record)."""
    committed = run.store.committed()
    return (committed[-1].record.save_seconds or None) if committed else None


def _warn_if_lead_too_short(save_seconds: float | None) -> None:
    lead = os.environ.get("PREEMPTIBLE_SIGNAL_LEAD")
    if lead and save_seconds and float(lead) < 2 * save_seconds + 15:
        warnings.warn(
            f"preemptible: the job's --signal lead is {float(lead):.0f} s, but the last checkpoint of this run took "
            f"{save_seconds:.1f} s to write: the warning may come too late. Raise --signal-lead to at least "
            f"{2 * save_seconds + 15:.0f} s (or add every_n_minutes periodic checkpoints).", stacklevel=3)


def _current_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return JobEnvironment.from_env().global_rank
