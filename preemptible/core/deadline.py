"""Knowing when the job will be killed, so that a checkpoint still fits before it.

SLURM's ``--signal=USR1@LEAD`` warning can come too late (the lead is shorter than the save) or not
at all (a job submitted without it). Under SLURM the job's end time is read with
``squeue -h -j JOB -o %e`` (refreshed every few minutes: an operator may extend the limit), and
training stops proactively once the time left would no longer fit an emergency save.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import datetime
from typing import Callable, Optional

from preemptible.core.environment import JobEnvironment


def parse_slurm_time(text: str) -> Optional[float]:
    """``2026-11-30T21:00:00`` (local time) → unix time; ``N/A``, ``NONE``, ``Unknown`` → ``None``."""
    text = text.strip()
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def squeue_end_time(job_id: str, timeout: float = 10.0) -> Optional[float]:
    exe = shutil.which("squeue")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return parse_slurm_time(out.stdout.splitlines()[0]) if out.returncode == 0 and out.stdout.strip() else None


class JobDeadline:
    """The job's hard end time, refreshed every ``refresh_seconds``.

    Args:
        env: the job environment (no deadline outside SLURM unless ``end_time`` is given).
        end_time: a fixed end time (unix seconds), or a function returning it — for other schedulers and tests.
        refresh_seconds: how often to ask the scheduler again.
    """

    def __init__(self, env: JobEnvironment, end_time: Optional[float | Callable[[], Optional[float]]] = None,
                 refresh_seconds: float = 300.0) -> None:
        if end_time is None and env.requeue_job_id:
            job = env.requeue_job_id
            end_time = lambda: squeue_end_time(job)  # noqa: E731
        self._source = end_time
        self.refresh_seconds = refresh_seconds
        self._value: Optional[float] = None
        self._read_at = -float("inf")

    @property
    def known(self) -> bool:
        return self._source is not None

    def end_time(self) -> Optional[float]:
        if self._source is None:
            return None
        if not callable(self._source):
            return float(self._source)
        now = time.monotonic()
        if now - self._read_at >= self.refresh_seconds:
            self._read_at = now
            self._value = self._source()
        return self._value

    def seconds_left(self) -> Optional[float]:
        end = self.end_time()
        return None if end is None else end - time.time()

    def too_close(self, needed_seconds: float) -> bool:
        """Whether less than ``needed_seconds`` remain before the hard end."""
        left = self.seconds_left()
        return left is not None and left < needed_seconds
