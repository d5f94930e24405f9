"""``PreemptionCallback``: Lightning's hooks turned into calls of the trainer-neutral ``PreemptionSession``.

What only Lightning has stays here (which hook is which point of the loop, the checkpoint dict,
loaders, loggers); every private Lightning access goes through :mod:`preemptible.lightning.hooks`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from preemptible.core.config import SessionConfig
from preemptible.core.environment import JobEnvironment
from preemptible.core.mapped import Span, copy_optimizers_out_of, copy_out_of, span_of
from preemptible.core.requeue import RequeueBackend
from preemptible.core.rng import capture_rng
from preemptible.core.rundir import RunDirError
from preemptible.core.schema import STATE_KEY
from preemptible.core.session import PreemptionSession
from preemptible.core.signals import DEFAULT_SIGNAL_NAMES
from preemptible.lightning import hooks
from preemptible.lightning import pltypes as pl  # annotations only (see pltypes: jsonargparse reads this module)
from preemptible.lightning.clisupport import keep_saved_cli_config
from preemptible.lightning.compat import CheckpointMismatch, check_checkpoint_fits
from preemptible.lightning.loaders import LoaderTracker
from preemptible.lightning.loggers import export_wandb_run_id, keep_logger_versions
from preemptible.lightning.resume import choose_checkpoint, newest_checkpoint
from preemptible.lightning.saving import LightningSnapshot, ValidationStartSnapshot, packed_state, warn_if_short_of_space

log = logging.getLogger(__name__)


class PreemptionCallback:
    r"""Survive preemption: checkpoint on a signal at a step all ranks agree on, requeue, resume exactly.

    A signal (``SIGUSR1`` from ``sbatch --signal``, ``SIGTERM`` on preemption or requeue,
    ``SIGUSR2`` under submitit) is only *recorded*. At the next optimizer-step boundary the ranks
    agree to stop at the same global step, write an emergency checkpoint atomically into
    ``<run_dir>/checkpoints/``, ask for a requeue (rank 0), and leave ``trainer.fit`` by raising
    :class:`~preemptible.Preempted` (exit code :data:`~preemptible.REQUEUE_EXIT_CODE`) on every
    rank. The restarted job calls :meth:`resume_path` and continues from the same global step with
    the same data order and random streams.

    Attached to the trainer, it also resumes by itself: ``trainer.fit(model, datamodule)`` without
    ``ckpt_path`` continues from the run's newest valid checkpoint (so a LightningCLI or Hydra config
    needs no ``ckpt_path``); an explicit ``ckpt_path`` still wins, with a warning when the run holds a
    newer committed checkpoint. The arguments (documented in ``__init__``, and in ``--help`` under
    LightningCLI) are those of :class:`~preemptible.core.config.SessionConfig`, validated there; the
    README's table explains each.

    Example::

        import lightning.pytorch as pl  # or: import pytorch_lightning as pl
        from preemptible import PreemptionCallback

        trainer = pl.Trainer(max_epochs=3, callbacks=[PreemptionCallback(run_dir="runs/exp1")])
        trainer.fit(model, datamodule=dm)  # a fresh start, or the resume of the same run

    ``preemptible.PreemptionCallback`` is a subclass of the ``Callback`` of the Lightning package the
    process imported (:mod:`preemptible.lightning.namespace`).

    .. note:: Lightning's own SLURM auto-requeue is switched off for this trainer (it checkpoints inside
       the signal handler and keeps training), and Lightning's SIGTERM handler is replaced during ``fit``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "PreemptionCallback":
        if cls is PreemptionCallback:
            # The namespace-neutral implementation was named before any Lightning was imported: become the
            # subclass of the Callback of the Lightning in use now (a real Callback, for isinstance checks).
            from preemptible.lightning.namespace import class_at_construction

            cls = class_at_construction()
        return super().__new__(cls)

    def __init__(
        self,
        run_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
        signals: Sequence[Union[str, int]] = DEFAULT_SIGNAL_NAMES,
        requeue: Union[str, RequeueBackend] = "auto",
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
        deadline: Union[bool, float, None] = True,
        agree_every_n_steps: int = 1,
        max_crash_requeues: Optional[int] = None,
        peer_timeout: Optional[float] = None,
    ) -> None:
        """Set up the run's session; signals are recorded from here on.

        Args:
            run_dir: the run's directory, the same for every restart (default: $PREEMPTIBLE_RUN_DIR, else
                runs/<SLURM_JOB_ID> under SLURM).
            signals: signals that mean "stop soon", by name (USR1, TERM, USR2) or number.
            requeue: auto (SLURM: scontrol requeue; submitit: submitit; else the exit code only), slurm,
                submitit, local or none.
            max_requeues: requeues the run may use; past it the checkpoint is kept and the process exits 1
                (default: $PREEMPTIBLE_MAX_REQUEUES, else 50).
            keep: committed checkpoints to keep (at least 2).
            verify: checksum (size and checksum) or size: how a checkpoint is checked before resuming from it.
            checksum: crc32 or sha256, for new checkpoints.
            exact_data: resume map-style training DataLoaders mid-epoch at the exact batch.
            save_on_finish: commit a last checkpoint when training ends.
            allow_world_size_change: resume a checkpoint written by a different number of ranks (inexactly).
            every_n_steps: a periodic safety checkpoint every N optimizer steps.
            every_n_minutes: a periodic safety checkpoint every M minutes.
            async_save: write periodic checkpoints in the background from a CPU copy.
            deadline: true: read the job's end time from SLURM and stop before it; a number: a fixed end
                time (unix seconds); false: off.
            agree_every_n_steps: under DDP, reduce the ranks' stop votes only every N steps.
            max_crash_requeues: requeues after a crash without warning (a killed rank, a lost node), counted
                apart from max_requeues (default: $PREEMPTIBLE_MAX_CRASH_REQUEUES, else 3).
            peer_timeout: seconds after which a dead or frozen peer rank makes every rank leave with exit
                code 145 (default: $PREEMPTIBLE_PEER_TIMEOUT, else 60; 0: off).
        """
        super().__init__()
        self.config = SessionConfig(
            run_dir=run_dir, signals=signals, requeue=requeue, max_requeues=max_requeues, keep=keep, verify=verify,
            checksum=checksum, exact_data=exact_data, save_on_finish=save_on_finish,
            allow_world_size_change=allow_world_size_change, every_n_steps=every_n_steps,
            every_n_minutes=every_n_minutes, async_save=async_save, deadline=deadline,
            agree_every_n_steps=agree_every_n_steps, max_crash_requeues=max_crash_requeues,
            peer_timeout=peer_timeout)
        self.session = PreemptionSession(self.config, JobEnvironment.from_env())  # records signals from here on
        self._loaders = LoaderTracker(enabled=exact_data, signals=self.config.signals)
        self._snapshot: Optional[LightningSnapshot] = None
        self._validation_due: Callable[[], bool] = lambda: False
        self._resume_asked = False
        # This rank's state after the training batch that a validation follows (or, resumed, the one that
        # owes a validation): saved, with the loop's progress from the validation's start, by a stop inside it.
        self._owed_rank_state: Optional[dict[str, Any]] = None
        self._redo_validation = False
        self._mapped_span: Optional[Span] = None  # where a memory-mapped checkpoint being restored lies
        if "wandb" in sys.modules or importlib.util.find_spec("wandb") is not None:
            try:
                export_wandb_run_id(self.session.run)
            except RunDirError:
                pass  # reported, with the fix, when training starts

    @property
    def state_key(self) -> str:
        return STATE_KEY

    @property
    def run_dir(self) -> Path:
        return self.session.run.path

    def resume_path(self) -> str | None:
        """The newest committed, valid checkpoint of this run, or ``None`` for a fresh start.

        Invalid checkpoints are reported and moved to ``checkpoints/quarantine/`` (by global rank 0
        only), and the previous valid one is returned. Call it on every rank; all get the same answer.
        """
        self._resume_asked = True
        return self.session.resume_path()

    # -- Lightning hooks --------------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        session = self.session
        session.open(rank=trainer.global_rank, world_size=trainer.world_size)
        newest = newest_checkpoint(trainer, session, already_asked=self._resume_asked)
        if trainer.is_global_zero:
            warn_if_short_of_space(session.run.store, pl_module)
        keep_logger_versions(trainer, session.run)
        keep_saved_cli_config(trainer)
        if not session.signals.installed:
            warnings.warn("preemptible: trainer.fit is not running in the main thread, so no signal handler "
                          "could be installed; preemption signals will not be noticed", stacklevel=2)
        if hooks.disable_lightning_auto_requeue(trainer):
            log.info("preemptible: Lightning's SLURM auto-requeue disabled; preemptible handles the signal")
        hooks.after_lightning_installs_handlers(trainer, session.signals.install)
        if self.config.exact_data and not hooks.intercept_train_loader_setup(
                trainer, self._loaders.prepare, self._loaders.after_lightning_load):
            warnings.warn("preemptible: this Lightning version offers no point to prepare train loaders; "
                          "mid-epoch resume will replay or skip batches", stacklevel=2)
        if not self.config.exact_data:  # no exact data: the train loaders' workers must still survive the signals
            hooks.intercept_train_loader_setup(trainer, self._loaders.shield_workers, lambda loaders: None)
        hooks.after_val_loader_setup(trainer, self._loaders.shield_workers)  # and the validation loaders' workers
        if signal.SIGTERM in session.signals.signals and session.signals.installed:
            # Ours is then the only SIGTERM handler on every rank: Lightning's per-batch broadcast of its
            # own SIGTERM flag could only carry 0. Our votes are reduced in its slot instead (one blocking
            # collective per batch either way); otherwise they go in a reduction of their own.
            session.agreement.deferred = hooks.replace_lightning_sigterm_broadcast(trainer, session.agreement.reduce_pending)
        session.on_peer_lost.append(hooks.stop_child_observer)  # the watchdog's exit code, not Lightning's SIGKILL
        if session.peers.watching:
            # A child rank that dies is the watchdog's to judge (within its bound, leaving with the crash code):
            # Lightning's observer, polling every 5 s, would otherwise SIGKILL this parent first when the watchdog's
            # thread is slow to run (a loaded machine), and a SIGKILLed rank 0 looks like an OOM kill of rank 0.
            hooks.stop_child_observer()
        self._snapshot = LightningSnapshot(trainer, lambda: self._rank_state(trainer))
        self._validation_due = lambda: hooks.validation_due(trainer)  # made once, not per batch
        # Lightning picks the checkpoint it loads before this hook and tells no callback: the run begins at
        # the point where it restores, with the user's choice or, when there is none, the run's newest.
        if not hooks.choose_checkpoint_to_restore(trainer, lambda asked, read: self._begin(
                trainer, pl_module, choose_checkpoint(asked, newest, trainer.is_global_zero), read)):
            warnings.warn("preemptible: this Lightning version offers no point to choose the checkpoint to restore; "
                          "pass trainer.fit(..., ckpt_path=callback.resume_path()) to resume", stacklevel=2)
            self._begin(trainer, pl_module, trainer.ckpt_path or (newest if self._resume_asked else None))

    def _begin(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
               ckpt: Optional[Union[str, "os.PathLike[str]"]], read: Optional[hooks.CheckpointReader] = None) -> Optional[str]:
        """Every rank, once the checkpoint to restore is known: check it fits, journal the (re)start.

        ``read`` loads it (memory-mapped) once for both the fit check and Lightning's restore.
        """
        ckpt = str(ckpt) if ckpt else None
        if ckpt:
            try:
                checkpoint = read(ckpt) if read is not None else None
            except Exception as exc:  # noqa: BLE001 - reported with the file name, before Lightning touches anything
                raise CheckpointMismatch(f"cannot read checkpoint {ckpt}: {exc}") from exc
            self._mapped_span = span = span_of(checkpoint)
            if checkpoint is not None and span is not None:
                # Only the weights and the optimizer states are copied by their loads (the optimizers' copy is made
                # when training starts); what else Lightning hands to its restore (callbacks' states: the
                # ModelCheckpoint's and EarlyStopping's score tensors, the loops, our own) is small and is kept
                # by those objects as given, so it gets its own memory now: nothing keeps the file mapped.
                for key in [k for k in checkpoint if k not in ("state_dict", "optimizer_states")]:
                    checkpoint[key] = copy_out_of(checkpoint[key], span)
            check_checkpoint_fits(ckpt, pl_module, trainer.world_size, self.config.allow_world_size_change,
                                  checkpoint=checkpoint)
            self.session.resumed_from = Path(ckpt)
        self.session.start(checkpoint=ckpt)
        return ckpt

    def on_sanity_check_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.session.signals.install()

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After the previous epoch's end hooks, before this epoch's loader (and its workers) starts.
        self.session.epoch_started(trainer.global_step, trainer.current_epoch)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or self._snapshot is None:
            return
        redone, self._redo_validation = self._redo_validation, False
        if redone:
            hooks.settle_redone_validation_progress(trainer)
        owed = None
        loops = hooks.fit_loop_state_owing_validation(trainer) if self._owed_rank_state is not None else None
        if loops is not None and self._owed_rank_state is not None:
            owed = ValidationStartSnapshot(self._snapshot, loops, self._owed_rank_state)
        self._owed_rank_state = None
        self.session.validation_started(trainer.global_step, trainer.current_epoch, owed, redone=redone)
        if self.session.stopping:
            self._leave(trainer)

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.session.active:
            return
        if self.session.validation_batch_end(trainer.global_step, trainer.current_epoch, batch_idx,
                                             sanity_check=trainer.sanity_checking):
            self._leave(trainer)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # The restore is over: what the optimizers kept of a mapped checkpoint gets memory of its own, so that no
        # page of the file is needed once it may be rotated away (preemptible.core.mapped).
        copy_optimizers_out_of(trainer.optimizers, self._mapped_span)
        self._mapped_span = None
        self._loaders.at_train_start()
        # A signal that came before the first step (during set-up or the sanity check): stop now.
        if self.session.training_started(trainer.global_step, trainer.current_epoch, loaded=trainer.ckpt_path):
            self._leave(trainer)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.session.stopping:
            # The checkpoint was taken at the end of the previous batch; leaving only now lets every
            # other callback and the LightningModule finish that batch's hooks (logging, metrics).
            self._leave(trainer)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        self._loaders.note_trained(progress.current.ready)
        assert self._snapshot is not None
        due = self._validation_due()
        if due:
            # Validation comes next: keep this rank's state as it is before validation draws anything.
            self._owed_rank_state = {"rng": capture_rng(), "loaders": self._loaders.state(trainer, owing_validation=True),
                                     "validation_owed": True}
        # Lightning (2.6) resumes a checkpoint taken on an epoch's last batch one epoch too far (the next
        # epoch is counted but never trained): such a stop waits for the next boundary, after the epoch's
        # end-of-epoch validation and hooks, like an uninterrupted run. A stop agreed where validation is
        # due is taken when it starts, owing it, so the resumed run neither skips that validation nor
        # shifts the random stream.
        self.session.boundary(trainer.global_step, trainer.current_epoch, self._snapshot,
                              epoch_ends=progress.is_last_batch, validation_due=lambda: due)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking and self._snapshot is not None:
            if self.session.validation_ended(trainer.global_step, trainer.current_epoch, self._snapshot):
                self._leave(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        assert self._snapshot is not None
        self.session.training_ended(trainer.global_step, trainer.current_epoch, self._snapshot)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.session.finished(trainer.global_step)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # Lightning's teardown, which comes next, puts back what its signal connector saw before fit:
        # make it put back what the session wants from here on instead.
        hooks.keep_handlers_through_teardown(trainer, self.session.abandon(exception))

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if self.session.active:
            self.session.end()
        hooks.restore_lightning_sigterm_broadcast(trainer)
        hooks.restore_checkpoint_choice(trainer)

    # -- state carried inside the checkpoint -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # A save that is not ours (ModelCheckpoint, a user's trainer.save_checkpoint): no collective is
        # allowed here, so only this rank's state goes in. Our own saves replace it with every rank's.
        return packed_state([self._rank_state(None)], gathered=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = copy_out_of(state_dict, self._mapped_span)  # kept until training starts: not the file's pages
        ranks = state_dict.get("ranks") or []
        rank = _current_rank()
        loaded = None
        if rank < len(ranks):
            loaded = ranks[rank]
        elif ranks:
            warnings.warn(f"preemptible: the checkpoint holds the random state of {len(ranks)} rank(s), this is rank "
                          f"{rank}; its random streams start fresh and the continuation will not be bit-exact", stacklevel=2)
        self._loaders.set_resume(loaded)
        if loaded is not None and loaded.get("validation_owed"):
            # The checkpoint was taken inside a validation: the resumed fit loop runs it first, and a stop
            # during that redone validation keeps this very state.
            self._owed_rank_state, self._redo_validation = loaded, True

    # -- internals ------------------------------------------------------------------------------------------
    def _rank_state(self, trainer: Optional["pl.Trainer"]) -> dict[str, Any]:
        return {"rng": capture_rng(), "loaders": self._loaders.state(trainer)}

    def _leave(self, trainer: "pl.Trainer") -> None:
        _flush_loggers(trainer)
        self.session.leave(before_exit=lambda: hooks.let_children_exit_first(hooks.lightning_spawned_children(trainer), 120))


def _flush_loggers(trainer: "pl.Trainer") -> None:
    """Write what the loggers still buffer (CSVLogger keeps up to 100 steps in memory), so no metric is lost."""
    for logger in trainer.loggers:
        try:
            logger.save()
            logger.finalize("preempted")
        except Exception as exc:  # noqa: BLE001 - a logger's trouble must not stop the exit path
            warnings.warn(f"preemptible: could not flush {type(logger).__name__} before exiting: {exc}", stacklevel=2)


def _current_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return JobEnvironment.from_env().global_rank
