"""Every place where preemptible reaches into Lightning's private objects, kept in one module.

Each access names the Lightning version it was checked against (``checked: 2.6``: lightning and
pytorch-lightning 2.6.x, the same code under two names; each function acts on the package of the
trainer it is given) and degrades (returning ``False``/``None``, with a warning where a refinement is lost) when
the attribute it needs is missing, so a Lightning release that moves things loses a refinement, not
the whole callback. Nothing else under ``preemptible/`` touches a private Lightning attribute.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import warnings
import zipfile
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from preemptible.lightning import namespace

if TYPE_CHECKING:
    import pytorch_lightning as pl

CHECKED_AGAINST = "2.6"


def _moved(what: str) -> None:
    warnings.warn(f"preemptible: this Lightning version has no {what} (checked against {CHECKED_AGAINST}); "
                  "falling back, see preemptible/lightning/hooks.py", stacklevel=3)


def dump_checkpoint(trainer: "pl.Trainer") -> dict[str, Any]:
    """The full training checkpoint, as ``trainer.save_checkpoint`` would write it, without writing it.

    checked: 2.6 — ``trainer._checkpoint_connector.dump_checkpoint(weights_only=False)``; the public
    ``save_checkpoint`` offers no way to get the dict and stream it into the store's temp file.
    """
    connector = getattr(trainer, "_checkpoint_connector", None)
    dump = getattr(connector, "dump_checkpoint", None)
    if dump is None:
        raise RuntimeError(f"preemptible: this Lightning version has no trainer._checkpoint_connector.dump_checkpoint "
                           f"(checked against {CHECKED_AGAINST}); please report it with your Lightning version")
    return dump(weights_only=False)


def validation_due(trainer: "pl.Trainer") -> bool:
    """Whether the fit loop runs validation right after the batch that just ended.

    checked: 2.6 — ``fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)``. When it
    moved, ``False``: the stop is then taken before that validation (still exact for training, the
    validation metrics of that step come from the resumed run).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    check = getattr(epoch_loop, "_should_check_val_fx", None)
    if check is None:
        _moved("fit_loop.epoch_loop._should_check_val_fx")
        return False
    if fetcher is None or not trainer.enable_validation:
        return False
    try:
        return bool(check(fetcher))
    except Exception:  # noqa: BLE001 - a private helper changed shape: save now rather than guess
        _moved("fit_loop.epoch_loop._should_check_val_fx(data_fetcher) of the known signature")
        return False


def fit_loop_state_owing_validation(trainer: "pl.Trainer") -> dict[str, Any] | None:
    """The fit loop's state now, at the start of a validation, made to say "this validation started, no batch done".

    Lightning 2.6 resumes such a state by running the validation before training on ("restarted mid
    evaluation"), and with no validation batch counted as done it runs it from its first batch.
    Everything else in the state is what the loop holds at validation start (training progress,
    ``_batches_that_stepped``), which resumes as a checkpoint taken at validation end does.
    checked: 2.6 — ``fit_loop.state_dict()``'s ``epoch_loop.val_loop.batch_progress`` (``_BatchProgress``:
    ``total``/``current`` with ready/started/processed/completed, ``is_last_batch``), and
    ``_EvaluationLoop.update_restart_stage`` (mid evaluation: started == ready, processed == started - 1).
    ``None`` when the layout moved: the stop then waits for the validation's end.
    """
    state = copy.deepcopy(trainer.fit_loop.state_dict())
    progress = state.get("epoch_loop.val_loop.batch_progress")
    counters = ("ready", "started", "processed", "completed")
    known = isinstance(progress, dict) and all(
        isinstance(progress.get(part), dict) and all(c in progress[part] for c in counters) for part in ("total", "current"))
    if not known or not isinstance(progress, dict):
        _moved("fit_loop.state_dict()['epoch_loop.val_loop.batch_progress'] of the known layout")
        return None
    done = progress["total"]["completed"]
    progress["total"].update(ready=done + 1, started=done + 1, processed=done, completed=done)
    progress["current"].update(ready=1, started=1, processed=0, completed=0)
    progress["is_last_batch"] = False
    return state


def settle_redone_validation_progress(trainer: "pl.Trainer") -> None:
    """At the start of a redone validation: the epoch's validation totals that the state above left one batch
    ahead go back to what the uninterrupted run has there (otherwise a later checkpoint of this epoch
    would look "mid evaluation" again). checked: 2.6 — ``val_loop.batch_progress.total``."""
    total: Any = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total  # a _ProcessedTracker at run time
    total.ready = total.started = total.processed = total.completed


def logger_experiment_created(logger: Any) -> bool:
    """Whether a TensorBoard/CSV/W&B logger has already created its writer (checked: 2.6 — ``logger._experiment``)."""
    return getattr(logger, "_experiment", None) is not None


def close_logger_experiment(logger: Any) -> None:
    """Close the writer a logger created and forget it, so the next use creates a new one (checked: 2.6)."""
    experiment = getattr(logger, "_experiment", None)
    if experiment is not None and hasattr(experiment, "close"):
        experiment.close()
    logger._experiment = None


def set_logger_version(logger: Any, version: Any) -> None:
    """Point a TensorBoard/CSV logger at ``version`` before it creates its writer (checked: 2.6 — ``logger._version``)."""
    logger._version = version


def replace_batch_sampler(loader: Any, batch_sampler: Any) -> None:
    """Give a ``torch.utils.data.DataLoader`` another batch sampler after construction.

    ``DataLoader.__setattr__`` refuses to re-assign ``batch_sampler`` once iterated set-up is done
    (checked: torch 2.13); the replacement yields the same index lists, so bypassing that guard does
    not change what the loader sees. Not Lightning's, but a private rule all the same: kept here.
    """
    object.__setattr__(loader, "batch_sampler", batch_sampler)


def mark_loader_resumable(loader: Any) -> None:
    """Make Lightning treat ``loader`` as stateful without warning (checked: 2.6 — it probes ``state_dict``).

    The real per-rank position travels in preemptible's own state, so these two are placeholders.
    """
    loader.state_dict = lambda: {"kept_by": "preemptible"}
    loader.load_state_dict = lambda state: None


def disable_lightning_auto_requeue(trainer: "pl.Trainer") -> bool:
    """Turn off ``SLURMEnvironment(auto_requeue=True)``: exactly one party may handle the signal.

    Lightning's handler saves a checkpoint *inside* the signal handler (a collective: it deadlocks
    when the signal reaches only some ranks) and then keeps training.
    """
    # Public, as is auto_requeue; the trainer's own package's class (lightning.fabric or lightning_fabric).
    SLURMEnvironment = namespace.of(trainer).load_fabric("plugins.environments", "SLURMEnvironment")
    env = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        env.auto_requeue = False
        return True
    return False


#: ``read(path)``: the checkpoint at ``path`` loaded once for this restore (see :func:`choose_checkpoint_to_restore`),
#: or ``None`` where Lightning's own strategy must read it (then nothing is shared).
CheckpointReader = Callable[[str], Optional[dict[str, Any]]]


def choose_checkpoint_to_restore(trainer: "pl.Trainer",
                                 choose: Callable[[Optional[str], CheckpointReader], Optional[str]]) -> bool:
    """Let ``choose(asked, read)`` decide the checkpoint ``fit`` restores; ``asked`` is Lightning's own choice.

    Lightning selects the path (``ckpt_path``, ``trainer.ckpt_path``, its SLURM ``"hpc"`` one) before
    any callback hook and restores it after ``setup``; no public API lets a callback supply one at
    that point (the ``trainer.ckpt_path`` setter only works before ``fit``). So the one call that
    restores the model, datamodule and callbacks (and, through ``_loaded_checkpoint``, the training
    state) is given the chosen path. Undone by :func:`restore_checkpoint_choice`.

    ``read(path)`` loads the checkpoint memory-mapped (:mod:`preemptible.core.mapped`) when the
    strategy would read it as a plain ``torch.load`` of a local file, and Lightning's restore then
    takes that very dict instead of reading the file again: one load per rank (shared with the
    fit check), its pages shared by the ranks of a node. Anything else (a sharded strategy, a custom
    ``CheckpointIO``, a URL) returns ``None`` and Lightning reads the file as it always does.
    checked: 2.6 — ``trainer._checkpoint_connector._restore_modules_and_callbacks(checkpoint_path, weights_only)``,
    which calls ``resume_start`` → ``trainer.strategy.load_checkpoint(checkpoint_path, weights_only=...)``.
    """
    connector = getattr(trainer, "_checkpoint_connector", None)
    restore = getattr(type(connector), "_restore_modules_and_callbacks", None)
    if connector is None or restore is None:
        return False

    def restore_chosen(checkpoint_path: Optional[str] = None, weights_only: Optional[bool] = None) -> None:
        loaded: dict[str, dict[str, Any]] = {}

        def read(path: str) -> Optional[dict[str, Any]]:
            if path not in loaded:
                checkpoint = _load_mapped_for(trainer, path, weights_only)
                if checkpoint is None:
                    return None
                loaded[path] = checkpoint
            return loaded[path]

        chosen = choose(checkpoint_path, read)
        if chosen is not None and chosen in loaded:
            with _strategy_returns(trainer, chosen, loaded.pop(chosen)):
                restore(connector, chosen, weights_only)
        else:
            restore(connector, chosen, weights_only)

    restore_chosen._preemptible = True  # type: ignore[attr-defined]
    connector._restore_modules_and_callbacks = restore_chosen  # an instance attribute shadows the method
    return True


def _load_mapped_for(trainer: "pl.Trainer", path: str, weights_only: Optional[bool]) -> Optional[dict[str, Any]]:
    """The checkpoint, memory-mapped, where that is what the strategy's own load amounts to; else ``None``.

    checked: 2.6 — ``Strategy.load_checkpoint`` (not overridden by the single-device and DDP strategies)
    is ``checkpoint_io.load_checkpoint(path, weights_only=...)``, and ``TorchCheckpointIO`` is
    ``torch.load(<open file>, map_location=lambda storage, loc: storage, weights_only=...)``.
    """
    from preemptible.core.mapped import load_mapped

    strategy = trainer.strategy
    base = namespace.of(trainer).load("strategies", "Strategy")
    torch_io = namespace.of(trainer).load_fabric("plugins.io.torch_io", "TorchCheckpointIO")
    plain = (getattr(type(strategy), "load_checkpoint", None) is getattr(base, "load_checkpoint", None)
             and type(strategy.checkpoint_io) is torch_io)
    if not plain or "://" in path or not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return None
    try:
        checkpoint = load_mapped(path, weights_only=weights_only, map_location=lambda storage, loc: storage)
    except Exception:  # noqa: BLE001 - e.g. a pickle of an older Lightning that only its legacy patch reads
        return None  # Lightning then reads the file itself, as it always does (with its own errors)
    return checkpoint if isinstance(checkpoint, dict) else None


@contextlib.contextmanager
def _strategy_returns(trainer: "pl.Trainer", path: str, checkpoint: dict[str, Any]) -> Iterator[None]:
    """While Lightning restores ``path``: ``trainer.strategy.load_checkpoint(path)`` returns ``checkpoint``
    (once), any other path is read as usual. checked: 2.6 — called once, by ``resume_start``."""
    strategy = trainer.strategy
    own = type(strategy).load_checkpoint
    before = strategy.__dict__.get("load_checkpoint")  # an instance override someone set: put back afterwards
    given = [checkpoint]

    def load_checkpoint(checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if given and str(checkpoint_path) == path:
            return given.pop()
        if before is not None:
            return before(checkpoint_path, weights_only=weights_only)
        return own(strategy, checkpoint_path, weights_only=weights_only)

    strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]  # instance attribute shadows the method
    try:
        yield
    finally:
        if before is not None:
            strategy.load_checkpoint = before  # type: ignore[method-assign]
        else:
            del strategy.load_checkpoint


def restore_checkpoint_choice(trainer: "pl.Trainer") -> None:
    connector = getattr(trainer, "_checkpoint_connector", None)
    if connector is not None and getattr(connector.__dict__.get("_restore_modules_and_callbacks"), "_preemptible", False):
        del connector._restore_modules_and_callbacks


def after_lightning_installs_handlers(trainer: "pl.Trainer", reinstall: Callable[[], None]) -> bool:
    """Run ``reinstall`` right after Lightning registers its own SIGTERM handler.

    Lightning replaces the SIGTERM handler when the fit stage starts with one that broadcasts a
    tensor from inside the handler and kills child processes. We put ours back at once.
    checked: 2.6 — ``trainer._signal_connector.register_signal_handlers``.
    """
    connector = getattr(trainer, "_signal_connector", None)
    register = getattr(connector, "register_signal_handlers", None)
    if connector is None or register is None or getattr(register, "_preemptible", False):
        return False

    def register_then_reinstall() -> None:
        # Lightning snapshots the handlers in place (ours) and puts that snapshot back at its teardown,
        # so ours keep recording until the callback's own teardown restores the ones from before it.
        register()
        reinstall()

    register_then_reinstall._preemptible = True  # type: ignore[attr-defined]
    connector.register_signal_handlers = register_then_reinstall
    return True


def replace_lightning_sigterm_broadcast(trainer: "pl.Trainer", replacement: Callable[[], None]) -> bool:
    """Run ``replacement`` in the slot of Lightning's per-batch SIGTERM broadcast (Lightning >= 2.1, DDP).

    Before *every* training batch the fit loop broadcasts ``trainer.received_sigterm`` from rank 0
    and waits for it: a blocking collective per batch, on every rank (a device sync under NCCL).
    That flag is set only by Lightning's own SIGTERM handler, which ours replaces on every rank for
    the whole fit, so the broadcast would only ever carry 0. The callback reduces its stop votes in
    that slot instead: the same number of collectives as without preemptible. Only call this when
    SIGTERM is one of the callback's signals, on every rank alike; undone by
    :func:`restore_lightning_sigterm_broadcast`. checked: 2.6 — ``_TrainingEpochLoop._broadcast_sigterm_tensor``.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if loop is None or not callable(getattr(type(loop), "_broadcast_sigterm_tensor", None)):
        return False

    def in_lightning_broadcast_slot() -> None:
        replacement()

    in_lightning_broadcast_slot._preemptible = True  # type: ignore[attr-defined]
    loop._broadcast_sigterm_tensor = in_lightning_broadcast_slot  # an instance attribute shadows the method
    return True


def restore_lightning_sigterm_broadcast(trainer: "pl.Trainer") -> None:
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if loop is not None and getattr(loop.__dict__.get("_broadcast_sigterm_tensor"), "_preemptible", False):
        del loop._broadcast_sigterm_tensor


def keep_handlers_through_teardown(trainer: "pl.Trainer", handlers: dict[int, Any]) -> None:
    """Make Lightning's signal-connector teardown put ``handlers`` back instead of the pre-fit ones.

    checked: 2.6 — ``trainer._signal_connector._original_handlers``.
    """
    saved = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
    if isinstance(saved, dict):
        saved.update(handlers)


def intercept_train_loader_setup(trainer: "pl.Trainer", prepare: Callable[[list[Any]], None],
                                 after_load: Callable[[list[Any]], None]) -> bool:
    """Call ``prepare(loaders)`` each time the fit loop has built its train loaders, and ``after_load(loaders)``
    once Lightning has given them the (rank 0) loader state from the checkpoint, before it iterates them.

    checked: 2.6 — ``fit_loop._load_combined_loader_states`` and ``fit_loop._combined_loader.flattened``.
    """
    fit_loop = trainer.fit_loop
    load_states = getattr(fit_loop, "_load_combined_loader_states", None)
    if load_states is None or getattr(load_states, "_preemptible", False):
        return False

    def prepare_then_load() -> None:
        combined = getattr(fit_loop, "_combined_loader", None)
        if combined is not None:
            prepare(combined.flattened)
        load_states()
        if combined is not None:
            after_load(combined.flattened)

    prepare_then_load._preemptible = True  # type: ignore[attr-defined]
    fit_loop._load_combined_loader_states = prepare_then_load  # type: ignore[method-assign]
    return True


def after_val_loader_setup(trainer: "pl.Trainer", call: Callable[[list[Any]], None]) -> bool:
    """Call ``call(loaders)`` each time the fit's validation loop has built its loaders, before it iterates them
    (the sanity check's validation included: the loop's first iterator starts its workers right after).

    checked: 2.6 — ``fit_loop.epoch_loop.val_loop.setup_data`` and its ``_combined_loader.flattened``.
    """
    val_loop = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None)
    setup_data = getattr(val_loop, "setup_data", None)
    if setup_data is None or getattr(setup_data, "_preemptible", False):
        return False

    def setup_then_call() -> None:
        setup_data()
        combined = getattr(val_loop, "_combined_loader", None)
        if combined is not None:
            call(combined.flattened)

    setup_then_call._preemptible = True  # type: ignore[attr-defined]
    val_loop.setup_data = setup_then_call  # type: ignore[union-attr]
    return True


def lightning_spawned_children(trainer: "pl.Trainer") -> list[Any]:
    """The rank processes Lightning's script launcher started from this process (empty elsewhere).

    checked: 2.6 — ``strategy.launcher.procs``.
    """
    launcher = getattr(trainer.strategy, "launcher", None)
    return list(getattr(launcher, "procs", None) or [])


def let_children_exit_first(children: list[Any], timeout: float) -> None:
    """Wait for Lightning-spawned ranks to exit before this (parent) rank does.

    Lightning's child-process observer SIGKILLs the parent as soon as a child exits with a
    non-zero code, which the requeue code is. We empty its watch list (its own "all finished"
    path) and wait for the children ourselves, so the parent's exit code reaches the supervisor.
    checked: 2.6 — the thread named ``child-process-observer`` and its ``_child_processes``.
    """
    if not children:
        return
    stop_child_observer()
    for proc in children:
        try:
            proc.wait(timeout=timeout)
        except Exception:  # noqa: BLE001 - a child that does not exit is killed below
            proc.kill()


def stop_child_observer() -> None:
    """Empty the watch list of Lightning's child-process observer (its own "all finished" path).

    It SIGKILLs this process as soon as a child exits with a non-zero code; a rank that leaves on
    purpose (a requeue code, or the crash code after the peer watchdog killed a frozen child) must
    end with its own code instead. checked: 2.6 — the thread named ``child-process-observer`` and its
    ``_child_processes``.
    """
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_child_processes"):
            thread._child_processes = []
