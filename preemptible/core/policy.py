"""What a rank asks for at a step boundary, and the stop that is pending once the ranks agreed.

:class:`StopPolicy` turns this rank's view (a recorded signal, the job's deadline, the periodic-save
schedule) into one vote (:mod:`preemptible.core.votes`); the agreement combines the votes of all
ranks. :class:`PendingStop` is the one explicit state of a stop that was agreed but is not taken
yet, because the trainer must first reach the place where the uninterrupted run would be (the next
boundary after an epoch's last batch, the start of a validation that is due), and then of the stop
taken (the checkpoint written, waiting to leave).
"""

from __future__ import annotations

import enum
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from preemptible.core import votes
from preemptible.core.deadline import JobDeadline
from preemptible.core.environment import JobEnvironment
from preemptible.core.signals import SignalNote
from preemptible.core.store import CheckpointStore

#: Margin for agreeing, requesting the requeue and exiting, on top of the save itself (seconds).
EXIT_MARGIN_SECONDS = 15.0
#: Assumed save time before the run has measured one (seconds).
UNMEASURED_SAVE_SECONDS = 10.0


class StopPolicy:
    """This rank's vote at a boundary: a signal beats the deadline, which beats a periodic save.

    Args:
        every_n_steps: vote for a periodic save at every N-th step (``None``: never).
        every_n_minutes: vote for a periodic save when this much time passed since the last save
            (global rank 0's clock only, so that every rank follows one schedule).
        deadline: the job's end time, or ``None``.
        is_global_zero: whether this is global rank 0.
        clock: monotonic seconds (a parameter for tests).
    """

    def __init__(self, every_n_steps: Optional[int] = None, every_n_minutes: Optional[float] = None,
                 deadline: Optional[JobDeadline] = None, is_global_zero: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self.deadline = deadline
        self.is_global_zero = is_global_zero
        self._clock = clock
        self.last_save_time = clock()
        self.save_seconds: Optional[float] = None  # the last measured save, from the commit records
        self.step_seconds = 0.0
        self._last_boundary = clock()

    def note_boundary(self, now: Optional[float] = None) -> float:
        """Measure the step that just ended; returns the clock reading (one per boundary)."""
        now = self._clock() if now is None else now
        self.step_seconds, self._last_boundary = now - self._last_boundary, now
        return now

    def note_save(self) -> None:
        self.last_save_time = self._clock()

    def seconds_needed_to_stop(self) -> float:
        """Two steps (the agreement's latency), the save doubled for safety, a margin for leaving."""
        save = self.save_seconds if self.save_seconds is not None else UNMEASURED_SAVE_SECONDS
        return 2 * self.step_seconds + 2 * save + EXIT_MARGIN_SECONDS

    def deadline_too_close(self) -> bool:
        return (self.is_global_zero and self.deadline is not None
                and self.deadline.too_close(self.seconds_needed_to_stop()))

    def vote(self, step: int, note: Optional[SignalNote]) -> int:
        if note is not None:
            return votes.for_signal(note.signum)
        if self.deadline_too_close():
            return votes.DEADLINE
        if self.every_n_steps and step % self.every_n_steps == 0:
            return votes.PERIODIC_SAVE
        if (self.every_n_minutes and self.is_global_zero
                and self._clock() - self.last_save_time >= 60 * self.every_n_minutes):
            return votes.PERIODIC_SAVE
        return votes.NOTHING


def deadline_from_setting(setting: Union[bool, float, None], env: JobEnvironment) -> Optional[JobDeadline]:
    """``True``: the job's end time from the scheduler; a number: that end time (unix seconds); ``False``/``None``: none."""
    if setting is True:
        return JobDeadline(env)
    if setting is False or setting is None:
        return None
    return JobDeadline(env, end_time=float(setting))


def last_save_seconds(store: CheckpointStore) -> Optional[float]:
    """How long the last committed checkpoint of this run took to write (from its commit record)."""
    committed = store.committed()
    return (committed[-1].record.save_seconds or None) if committed else None


def warn_if_lead_too_short(lead: Optional[float], save_seconds: Optional[float]) -> None:
    """Say at start when the job's ``--signal`` lead would not fit the save this run measured."""
    needed = 2 * save_seconds + EXIT_MARGIN_SECONDS if save_seconds else 0.0
    if lead and save_seconds and lead < needed:
        warnings.warn(
            f"preemptible: the job's --signal lead is {lead:.0f} s, but the last checkpoint of this run took "
            f"{save_seconds:.1f} s to write: the warning may come too late. Raise --signal-lead to at least "
            f"{needed:.0f} s (or add every_n_minutes periodic checkpoints).", stacklevel=3)


class Wait(enum.Enum):
    """Where an agreed decision waits before it is acted on."""

    NEXT_BOUNDARY = "next_boundary"
    #: The trainer validates right after this boundary: the stop is taken when that validation starts,
    #: saving the state from its start and owing the validation (the resumed run runs it first).
    VALIDATION_START = "validation_start"
    #: As above when the trainer cannot hand over the state at validation start: wait for the end.
    VALIDATION_END = "validation_end"


@dataclass(frozen=True)
class Deferred:
    """An agreed decision (a vote value) that waits for a place in the loop."""

    decided: int
    until: Wait


@dataclass(frozen=True)
class Stopped:
    """The stop was taken: the checkpoint (or the one resumed from) holds the state; leave next."""

    step: int
    reason: str
    checkpoint: Optional[Path]
    over_limit: bool = False
    #: The checkpoint holds the state from the start of a validation that the resumed run must run first.
    owes_validation: bool = False


class PendingStop:
    """The one state of a stop between agreement and leaving: nothing, deferred, or stopped.

    Transitions: ``nothing → deferred`` (:meth:`defer`), ``deferred → nothing`` (:meth:`take`, which
    hands the decision back to act on), ``nothing|deferred → stopped`` (:meth:`stopped`),
    ``stopped → nothing`` (:meth:`clear`, when training ends right after the stop).
    """

    def __init__(self) -> None:
        self.deferred: Optional[Deferred] = None
        self.stop: Optional[Stopped] = None

    @property
    def idle(self) -> bool:
        return self.deferred is None and self.stop is None

    def defer(self, decided: int, until: Wait) -> None:
        if self.stop is not None:
            raise RuntimeError("preemptible: a stop was already taken; nothing can be deferred after it")
        self.deferred = Deferred(decided, until)

    def take(self, at: Wait) -> int:
        """The deferred decision waiting for ``at`` (and forget it), else 0."""
        if self.deferred is None or self.deferred.until is not at:
            return 0
        decided, self.deferred = self.deferred.decided, None
        return decided

    def stopped(self, stop: Stopped) -> None:
        self.deferred, self.stop = None, stop

    def clear(self) -> None:
        self.deferred, self.stop = None, None
