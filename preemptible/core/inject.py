"""Faults on purpose, for users' own tests: ``PREEMPTIBLE_INJECT`` makes a rank die, freeze or get a signal at a step.

Why in-process: a supervisor that watches ``progress.json`` from outside sees a step late when steps take
under a millisecond (``--preempt-at-step 8`` once landed at step 16). Here the rank acts on itself at
the boundary of the step asked for, right after that boundary's vote, which is where an outside signal
sent on seeing step N in ``progress.json`` would be looked at first: the same semantics, exactly.

The value is a comma-separated list of ``ACTION:STEP[:RANK[:ATTEMPT]]``:

* ``ACTION``: ``kill`` (SIGKILL, as the OOM killer), ``segv`` (SIGSEGV, as a crash in native code),
  ``freeze`` (SIGSTOP, as a hung process), a signal name (``USR1``, ``TERM``: a preemption warning), or
  ``group-`` and a signal name: the signal to this process's whole process group (every rank of a
  local launcher and their DataLoader workers, as SLURM signals every process of a step);
* ``STEP``: the global step; ``RANK``: a global rank or ``*`` (default: every rank);
* ``ATTEMPT``: the restart count it applies to (``SLURM_RESTART_COUNT`` or ``PREEMPTIBLE_ATTEMPT``), or
  ``*`` (default ``0``: the first attempt only, so that a resumed run does not crash again at that step).

Example: ``PREEMPTIBLE_INJECT=kill:8:1`` kills rank 1 at step 8 of the first attempt. ``preemptible run
--kill-at-step 8 --target rank:1`` sets it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from preemptible.core.signals import parse_signal

_ACTIONS = {"kill": signal.SIGKILL, "segv": signal.SIGSEGV, "freeze": signal.SIGSTOP}


@dataclass(frozen=True)
class Fault:
    action: str
    step: int
    rank: Optional[int] = None  # None: every rank
    attempt: Optional[int] = 0  # None: every attempt

    @property
    def to_group(self) -> bool:
        return self.action.startswith("group-")

    @property
    def signum(self) -> int:
        return int(_ACTIONS.get(self.action) or parse_signal(self.action.removeprefix("group-")))

    def render(self) -> str:
        rank = "*" if self.rank is None else str(self.rank)
        attempt = "*" if self.attempt is None else str(self.attempt)
        return f"{self.action}:{self.step}:{rank}:{attempt}"


def parse_faults(text: Optional[str]) -> list[Fault]:
    """``"kill:8:1,USR1:12"`` → faults; a malformed item is a ``ValueError`` naming it and the format."""
    faults = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        fields = item.split(":")
        try:
            if len(fields) < 2 or len(fields) > 4:
                raise ValueError("expected 2 to 4 fields")
            action = fields[0].lower() if fields[0].lower() in _ACTIONS else fields[0]
            rank = None if len(fields) < 3 or fields[2] in ("*", "") else int(fields[2])
            attempt = 0 if len(fields) < 4 else (None if fields[3] in ("*", "") else int(fields[3]))
            fault = Fault(action, int(fields[1]), rank, attempt)
            fault.signum  # noqa: B018 - refuses an unknown action here, not at the step
        except ValueError as exc:
            raise ValueError(f"PREEMPTIBLE_INJECT item {item!r}: {exc}; use ACTION:STEP[:RANK[:ATTEMPT]] with ACTION kill, "
                             "segv, freeze or a signal name (USR1, TERM), e.g. kill:8:1") from None
        faults.append(fault)
    return faults


class FaultPlan:
    """This rank's faults of this attempt, by step (empty almost always: one dict lookup per step)."""

    def __init__(self, faults: list[Fault], rank: int, attempt: int) -> None:
        self.by_step = {f.step: f for f in faults if f.rank in (None, rank) and f.attempt in (None, attempt)}

    def __bool__(self) -> bool:
        return bool(self.by_step)

    def due(self, step: int) -> Optional[Fault]:
        return self.by_step.pop(step, None)


def fire(fault: Fault) -> None:
    """Do it to this process (a SIGSTOP returns once someone sends SIGCONT).

    A signal to the group is sent by a short-lived process of its own session, as slurmstepd sends it
    from outside: sent by this rank, its DataLoader workers would take a SIGTERM from their parent,
    which means "exit now" to them (see :mod:`preemptible.core.workers`), not the job's preemption.
    The call returns once the signal is sent.
    """
    if fault.to_group:
        group = os.getpgid(0)
        sender = "import os, sys; os.killpg(int(sys.argv[1]), int(sys.argv[2]))"
        try:
            subprocess.run([sys.executable, "-I", "-S", "-c", sender, str(group), str(fault.signum)],
                           start_new_session=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError):  # no helper process: the signal still goes, from here
            os.killpg(group, fault.signum)
    else:
        os.kill(os.getpid(), fault.signum)
