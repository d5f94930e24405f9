"""The few places where preemptible reaches into Lightning's private objects, kept in one module.

Each function degrades to a no-op (returning ``False``) when the attribute it needs is missing,
so a Lightning release that moves things loses a refinement, not the whole callback.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytorch_lightning as pl


def disable_lightning_auto_requeue(trainer: "pl.Trainer") -> bool:
    """Turn off ``SLURMEnvironment(auto_requeue=True)``: exactly one party may handle the signal.

    Lightning's handler saves a checkpoint *inside* the signal handler (a collective: it deadlocks
    when the signal reaches only some ranks) and then keeps training.
    """
    from lightning_fabric.plugins.environments import SLURMEnvironment

    env = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(env, SLURMEnvironment) and env.auto_requeue:
        env.auto_requeue = False
        return True
    return False


def after_lightning_installs_handlers(trainer: "pl.Trainer", reinstall: Callable[[], None]) -> bool:
    """Run ``reinstall`` right after Lightning registers its own SIGTERM handler.

    Lightning replaces the SIGTERM handler when the fit stage starts with one that broadcasts a
    tensor from inside the handler and kills child processes. We put ours back at once.
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
    :func:`restore_lightning_sigterm_broadcast`.
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
    """Make Lightning's signal-connector teardown put ``handlers`` back instead of the pre-fit ones."""
    saved = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
    if isinstance(saved, dict):
        saved.update(handlers)


def intercept_train_loader_setup(trainer: "pl.Trainer", prepare: Callable[[list[Any]], None],
                                 after_load: Callable[[list[Any]], None]) -> bool:
    """Call ``prepare(loaders)`` each time the fit loop has built its train loaders, and ``after_load(loaders)``
    once Lightning has given them the (rank 0) loader state from the checkpoint, before it iterates them."""
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


def lightning_spawned_children(trainer: "pl.Trainer") -> list[Any]:
    """The rank processes Lightning's script launcher started from this process (empty elsewhere)."""
    launcher = getattr(trainer.strategy, "launcher", None)
    return list(getattr(launcher, "procs", None) or [])


def let_children_exit_first(children: list[Any], timeout: float) -> None:
    """Wait for Lightning-spawned ranks to exit before this (parent) rank does.

    Lightning's child-process observer SIGKILLs the parent as soon as a child exits with a
    non-zero code, which the requeue code is. We empty its watch list (its own "all finished"
    path) and wait for the children ourselves, so the parent's exit code reaches the supervisor.
    """
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_child_processes"):
            thread._child_processes = []  # type: ignore[attr-defined]
    for proc in children:
        try:
            proc.wait(timeout=timeout)
        except Exception:  # noqa: BLE001 - a child that does not exit is killed below
            proc.kill()
