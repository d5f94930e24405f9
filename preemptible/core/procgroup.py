"""Tearing the ``torch.distributed`` process groups down before the interpreter exits.

Why: a gloo process group that is still alive when the interpreter finalizes is destroyed by C++
static destructors, in an order that sometimes finds one of its threads still joinable; the process
then aborts ("terminate called without an active exception", exit code 134) after training has
finished, about one 2-rank job in ten under ``srun``, and a finished job is reported FAILED.
Destroying the groups while Python still runs joins those threads in order.

When: at interpreter exit (:func:`release_at_exit`), not when ``fit`` ends, because the user's script
may still use the group afterwards (``trainer.test``, a barrier before saving final weights). At
that point no code can use any group any more, so every group goes, whoever created it (the
trainer's strategy or the user): that is what finalization would do anyway, only in order. Lightning
itself does the same at exit, but only for NCCL.

Not after an unexplained error: a collective may still be in flight towards a peer that is gone,
and destroying the group would wait for it. The process fails then anyway (the exit code is
non-zero either way); the peer watchdog (:mod:`preemptible.core.watchdog`) bounds that case.
"""

from __future__ import annotations

import atexit
import logging
import signal

log = logging.getLogger(__name__)

_state = {"registered": False, "release": True}


def release_process_groups() -> bool:
    """Destroy every ``torch.distributed`` process group of this process now; whether there was one.

    Call it on every rank once no collective follows (a plain loop or a Fabric script after its
    loop). It is not a collective itself for gloo; for NCCL it aborts nothing in flight.
    """
    try:
        import torch.distributed as dist
    except ImportError:  # torch without distributed support
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    previous = signal.getsignal(signal.SIGINT)
    try:
        # A Ctrl-C in the middle would leave the group half destroyed, which is the abort this avoids.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: cannot touch handlers, tear down all the same
        previous = None
    try:
        dist.destroy_process_group()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return True


def release_at_exit() -> None:
    """Destroy the process groups when the interpreter exits (registered once per process)."""
    _state["release"] = True
    if not _state["registered"]:
        _state["registered"] = True
        atexit.register(_at_exit)


def keep_at_exit() -> None:
    """An unexplained error ended training: leave the groups to the interpreter (see the module's docstring)."""
    _state["release"] = False


def _at_exit() -> None:
    if not _state["release"]:
        return
    try:
        release_process_groups()
    except Exception as exc:  # noqa: BLE001 - at exit: report, never turn a clean exit into a traceback
        log.warning("preemptible: could not destroy the torch.distributed process group at exit: %s", exc)
