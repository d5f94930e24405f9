"""What a rank asks for at a step boundary, as one integer that a max-reduction can combine.

Larger values win: any stop (a signal or the deadline) beats a periodic save, which beats nothing.
Signals are offset so that every signal number, SIGHUP's 1 included, stays above the others.
"""

from __future__ import annotations

import signal

NOTHING = 0
PERIODIC_SAVE = 1
DEADLINE = 2
_SIGNAL_BASE = 100


def for_signal(signum: int) -> int:
    return _SIGNAL_BASE + signum


def is_stop(vote: int) -> bool:
    return vote >= DEADLINE


def reason(vote: int) -> str:
    """The human-readable cause: ``"SIGUSR1"``, ``"deadline"``, ``"periodic"``."""
    if vote >= _SIGNAL_BASE:
        try:
            return signal.Signals(vote - _SIGNAL_BASE).name
        except ValueError:
            return f"signal {vote - _SIGNAL_BASE}"
    return {DEADLINE: "deadline", PERIODIC_SAVE: "periodic"}.get(vote, "none")
