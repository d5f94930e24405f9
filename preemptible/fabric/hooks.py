"""Every place where preemptible reaches into Lightning Fabric's private objects, kept in one module.

The same rule as :mod:`preemptible.lightning.hooks`, for Fabric (``lightning.fabric`` and the
standalone ``lightning_fabric`` alike: the same classes under two package names, so nothing here
imports either). Each access names the version it was checked against and degrades when it moved.
"""

from __future__ import annotations

import threading
from typing import Any

CHECKED_AGAINST = "2.6"


def inner_dataloader(loader: Any) -> Any:
    """The ``torch.utils.data.DataLoader`` inside what ``fabric.setup_dataloaders`` returned (itself otherwise).

    checked: 2.6 — ``_FabricDataLoader._dataloader``; Fabric offers no public accessor. Its
    ``__iter__`` iterates that loader (and moves batches to the device), so wrapping the inner
    loader's batch sampler is what the Fabric loader then draws from.
    """
    inner = getattr(loader, "_dataloader", None)
    return inner if inner is not None else loader


def launched_children(fabric: Any) -> list[Any]:
    """The rank processes Fabric's script launcher started from this process (empty elsewhere).

    checked: 2.6 — ``fabric.strategy.launcher.procs`` (``_SubprocessScriptLauncher``).
    """
    launcher = getattr(fabric.strategy, "launcher", None)
    return list(getattr(launcher, "procs", None) or [])


def let_children_exit_first(children: list[Any], timeout: float) -> None:
    """Wait for Fabric-launched ranks to exit before this (parent) rank does.

    Fabric's child-process observer SIGKILLs the parent as soon as a child exits with a non-zero
    code, which the requeue code is. Its watch list is emptied (its own "all finished" path) and the
    children are awaited here, so the parent's exit code reaches the supervisor.
    checked: 2.6 — the thread named ``child-process-observer`` and its ``_child_processes``.
    """
    if not children:
        return
    for thread in threading.enumerate():
        if thread.name == "child-process-observer" and hasattr(thread, "_child_processes"):
            thread._child_processes = []
    for proc in children:
        try:
            proc.wait(timeout=timeout)
        except Exception:  # noqa: BLE001 - a child that does not exit in time is killed
            proc.kill()
