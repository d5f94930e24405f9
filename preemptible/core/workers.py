"""DataLoader worker processes and the job's signals: a signal meant for the job must not kill a worker.

Under SLURM every process of a step gets the step's signals: slurmstepd sends the SIGTERM of a
preemption without ``preempt_send_user_signal``, of a requeue or of ``scancel``, and ``--signal``'s
USR1, to each pid of the step, DataLoader workers included (``preemptible run`` and a terminal signal
the whole process group the same way). The main process records the signal and stops at the agreed
step; it gets there only if its workers are still alive:

* SIGTERM: in each worker torch installs a C handler (``_set_worker_signal_handlers``) that exits
  quietly when the SIGTERM comes from the worker's parent and otherwise dies by the signal. A worker
  dead that way makes the main process raise "DataLoader worker (pid ...) exited unexpectedly" (its
  SIGCHLD handler, or its next fetch): the training crashes before its emergency checkpoint.
* SIGUSR1, SIGUSR2: their default action ends the process. A forked worker inherits the main
  process's recording handler (which ignores the signal in forked children) if that was installed
  before the loader's iterator started; a worker started by spawn/forkserver, or forked earlier, dies.

What a worker must still do: end when torch ends it, and end when its parent is gone. Torch ends
workers with SIGTERM from the parent: ``_shutdown_workers`` falls back to ``terminate()`` when a
worker did not exit within its join timeout, and multiprocessing's exit handler terminates the daemon
children still alive when the main process exits and then joins them *without* a timeout (a loader
iterator that outlives ``atexit``, e.g. held in a reference cycle).

Why not a Python handler that ignores SIGTERM while the parent lives: a Python handler is not told who
sent the signal, so it would ignore the parent's ``terminate()`` too. The exit join above would then
wait forever on a worker that is itself waiting for work (the main process hangs at exit), and torch's
fallback would leave hung workers behind. Python handlers also run only in the main thread between
bytecodes: a worker blocked in C code would not even notice its orphaning that way.

What is done instead (:func:`shield_worker_from_job_signals`, run first in every worker wrapped by
preemptible, before the user's ``worker_init_fn``):

* SIGTERM is blocked in the worker's main thread (threads started later inherit the mask), and one
  daemon thread takes it with ``sigtimedwait``, which reports the sender. From the parent: exit at
  once with code 0, as torch's handler does. From anyone else while the parent lives: ignored (the
  same signal reached the main process, which stops at the agreed step and then shuts the workers
  down normally). Once the parent is gone (``getppid()`` changed): exit, whoever sent it; the thread
  also looks every :data:`ORPHAN_CHECK_SECONDS` without a signal, so an orphan busy in a long
  ``__getitem__`` ends too (torch's own check runs only between two batches).
* The other preemption signals (USR1, USR2; INT or others when the run records them) get a Python
  handler that does nothing. A handler rather than ``SIG_IGN``: exec resets handled signals to their
  default but keeps ignored ones, so a program the dataset starts keeps its normal signals.
* SIGINT, when the run does not record it, keeps Python's behaviour: a KeyboardInterrupt that ends the
  worker's loop, as torch expects (Ctrl-C reaches the main process too, which stops).

Known limits: the waiting thread needs the GIL to act, so a worker stuck in C code that holds the GIL
is not ended by the parent's ``terminate()`` (torch's C handler would have ended it; SIGKILL still
does, as SLURM's KillWait sends). A program that dataset code starts from a worker inherits SIGTERM
blocked (the mask survives fork and exec; a child forked by Python itself, ``os.fork`` or
multiprocessing, gets it unblocked again); it ends on its own, on SIGKILL, or on SIGTERM once it
unblocks it. A signal that arrives before the worker reaches its ``worker_init_fn`` (its first
milliseconds when forked, the interpreter's start under spawn) still finds torch's handler. The mask
reaches only threads started after it: a forked worker (Linux's default start method) has none
before, but a worker started by ``spawn``/``forkserver`` already has a thread from its interpreter's
start (measured: torch 2.13, Python 3.11), which the kernel may hand a SIGTERM to, and torch's
handler then still kills the worker on a SIGTERM from elsewhere; USR1/USR2 are shielded either way.
Where ``sigtimedwait`` is missing (macOS), SIGTERM keeps torch's handler.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Iterable, Optional

from preemptible.core.signals import DEFAULT_SIGNALS, parse_signal

#: Seconds between two looks at the parent by a worker's SIGTERM thread when no signal comes.
ORPHAN_CHECK_SECONDS = 1.0
#: Exit code of a worker that leaves because of SIGTERM from its parent or because it was orphaned
#: (torch's own handler exits 0 on its parent's SIGTERM).
WORKER_EXIT_CODE = 0

_shielded_in_pid: Optional[int] = None


def _ignore(signum: int, frame: Any) -> None:
    """A preemption signal in a worker: the main process got it too and decides."""


def shield_worker_from_job_signals(signals: Iterable[str | int | signal.Signals] = DEFAULT_SIGNALS) -> bool:
    """In a DataLoader worker's main thread: keep the job's preemption ``signals`` from ending it (see module doc).

    Returns ``True`` when SIGTERM is now handled by the sender-aware thread. Idempotent per process.
    """
    global _shielded_in_pid
    if threading.current_thread() is not threading.main_thread():
        return False  # handlers and the mask belong to the main thread (a thread-based loader: nothing to do)
    wanted = tuple(dict.fromkeys(parse_signal(s) for s in signals))
    for signum in wanted:
        if signum not in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, _ignore)
    if signal.SIGTERM not in wanted or not hasattr(signal, "sigtimedwait"):
        return False
    if _shielded_in_pid == os.getpid():
        return True
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os.register_at_fork(after_in_child=_unblock_sigterm)
    threading.Thread(target=_take_sigterm, args=(parent,), name="preemptible-worker-sigterm", daemon=True).start()
    _shielded_in_pid = os.getpid()
    return True


def _unblock_sigterm() -> None:
    """A process forked by dataset code from a shielded worker: it has no SIGTERM thread, so no blocked SIGTERM."""
    global _shielded_in_pid
    _shielded_in_pid = None
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _take_sigterm(parent: int, exit_now: Callable[[int], Any] = os._exit) -> None:
    """The worker's SIGTERM thread: exit on the parent's SIGTERM or once orphaned; ignore the job's SIGTERM."""
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, ORPHAN_CHECK_SECONDS)
        orphaned = os.getppid() != parent
        if orphaned or (info is not None and info.si_pid == parent):
            exit_now(WORKER_EXIT_CODE)
            return


class ShieldedWorkerInit:
    """``worker_init_fn`` wrapper: shield the worker from the job's signals, then run the wrapped function.

    Picklable (for spawn/forkserver workers) when the wrapped function is.
    """

    def __init__(self, user_fn: Optional[Callable[[int], Any]],
                 signals: Iterable[str | int | signal.Signals] = DEFAULT_SIGNALS) -> None:
        self.user_fn = user_fn
        self.signals = tuple(int(parse_signal(s)) for s in signals)

    def __call__(self, worker_id: int) -> None:
        shield_worker_from_job_signals(self.signals)
        self.extra_setup()
        if self.user_fn is not None:
            self.user_fn(worker_id)

    def extra_setup(self) -> None:
        """What a subclass adds in the worker, after the shield and before the user's function."""


def shield_loader_workers(loader: Any, signals: Iterable[str | int | signal.Signals] = DEFAULT_SIGNALS) -> bool:
    """Make ``loader``'s future worker processes survive the job's ``signals``; ``True`` if it has workers.

    For any object with ``num_workers`` and ``worker_init_fn`` (a ``DataLoader``, torchdata's
    ``StatefulDataLoader``); workers already running (a persistent iterator) keep what they started with.
    """
    if int(getattr(loader, "num_workers", 0) or 0) <= 0 or not hasattr(loader, "worker_init_fn"):
        return False
    current = loader.worker_init_fn
    if isinstance(current, ShieldedWorkerInit):
        current.signals = tuple(dict.fromkeys((*current.signals, *(int(parse_signal(s)) for s in signals))))
        return True
    loader.worker_init_fn = ShieldedWorkerInit(current, signals)
    return True
