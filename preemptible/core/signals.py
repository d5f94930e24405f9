"""Recording preemption signals without acting on them.

A signal handler runs between two bytecodes of whatever the main thread was doing: in the middle
of a collective, a checkpoint write, a DataLoader fetch. Doing real work there is how training
deadlocks or corrupts checkpoints, so the handler here only notes *which* signal came, *when*
and *how often*. The training loop reads the note at the next step boundary.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterable, Union

Handler = Union[Callable[[int, Any], Any], int, None]

#: SIGUSR1 from ``sbatch --signal``, SIGTERM from preemption/requeue/cancel, SIGUSR2 from submitit.
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2)
#: The same, by name: what a configuration file (LightningCLI, Hydra) can write down.
DEFAULT_SIGNAL_NAMES: tuple[str, ...] = tuple(s.name[3:] for s in DEFAULT_SIGNALS)


def parse_signal(value: str | int | signal.Signals) -> signal.Signals:
    """``"USR1"``, ``"SIGUSR1"``, ``10`` or ``signal.SIGUSR1`` → ``signal.SIGUSR1``."""
    if isinstance(value, signal.Signals):
        return value
    if isinstance(value, int):
        return signal.Signals(value)
    name = value.strip().upper()
    if name.isdigit():
        return signal.Signals(int(name))
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {value!r}: use a name such as USR1, TERM or USR2") from None


@dataclass(frozen=True)
class SignalNote:
    """What the handler saw first, and how many signals have arrived in all."""

    signum: int
    first_at: float
    count: int

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class SignalRecorder:
    """Installs handlers that only record preemption signals.

    Handlers are installed by :meth:`install` and the previous ones put back by :meth:`restore`.
    Forked children (DataLoader workers inherit handlers on fork) ignore the signal: a worker
    killed by SIGUSR1's default action would crash the loader in the middle of the save, and the
    parent shuts its workers down anyway.

    Example::

        recorder = SignalRecorder([signal.SIGUSR1, signal.SIGTERM])
        recorder.install()
        ...
        if recorder.note is not None:  # at a step boundary, never in the handler
            save_and_exit()
        recorder.restore()
    """

    def __init__(self, signals: Iterable[str | int | signal.Signals] = DEFAULT_SIGNALS) -> None:
        self.signals: tuple[signal.Signals, ...] = tuple(dict.fromkeys(parse_signal(s) for s in signals))
        if signal.SIGKILL in self.signals or signal.SIGSTOP in self.signals:
            raise ValueError("SIGKILL and SIGSTOP cannot be caught; remove them from `signals`")
        self._owner_pid = os.getpid()
        self._previous: dict[signal.Signals, Handler] = {}
        # Plain attributes, written only by the handler: assigning an int or float is atomic
        # under the GIL, and the handler never allocates a lock that the main thread might hold.
        self._signum = 0
        self._first_at = 0.0
        self._count = 0

    # -- the handler --------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner_pid:
            return  # a forked DataLoader worker: the parent decides
        if self._count == 0:
            self._signum = signum
            self._first_at = time.time()
        self._count += 1

    # -- reading --------------------------------------------------------------------------------
    @property
    def note(self) -> SignalNote | None:
        """The first signal recorded (with the total count), or ``None``."""
        if self._count == 0:
            return None
        return SignalNote(self._signum, self._first_at, self._count)

    def clear(self) -> None:
        self._signum, self._first_at, self._count = 0, 0.0, 0

    # -- installing -----------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        """Put our handler in place; remember what was there the first time. Idempotent.

        Only the main thread may install handlers (a Python rule); elsewhere this is a no-op with
        :attr:`installed` left false, and the caller should warn.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        self._owner_pid = os.getpid()
        for signum in self.signals:
            current = signal.getsignal(signum)
            if current == self._handle:
                continue
            if signum not in self._previous:
                self._previous[signum] = current
            signal.signal(signum, self._handle)

    def ignore_from_now_on(self) -> None:
        """Set the signals to SIG_IGN: for a process that has saved and is exiting (see ``PreemptionSession.abandon``)."""
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                signal.signal(signum, signal.SIG_IGN)
            self._previous.clear()

    def previous_handler(self, signum: int) -> Handler:
        return self._previous.get(signal.Signals(signum))

    def previous_handlers(self) -> dict[int, Handler]:
        """The handler found before ours for each signal (``SIG_DFL`` where there was none)."""
        return {s: self.previous_handler(s) or signal.SIG_DFL for s in self.signals}

    def restore(self) -> None:
        """Put back the handlers found at the first :meth:`install` (where ours is still in place)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
