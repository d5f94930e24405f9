"""The run's event journal, ``<run_dir>/events.jsonl``: one JSON object per line.

Every rank appends with a single ``write`` on a file opened with ``O_APPEND``, so lines from
several ranks and several attempts interleave whole on a local filesystem. A process killed in
the middle of a write can leave a torn last line; :func:`read_events` skips it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from preemptible.core.environment import JobEnvironment
from preemptible.core.schema import check_event, read_events

__all__ = ["Journal", "read_events"]


class Journal:
    """Appends events tagged with job id, restart count, host and rank."""

    def __init__(self, path: str | os.PathLike[str], rank: int | None = None, env: JobEnvironment | None = None) -> None:
        self.path = Path(path)
        self.env = env or JobEnvironment.from_env()
        self.rank = self.env.global_rank if rank is None else rank

    def append(self, event: str, **fields: Any) -> None:
        """Append one event; its name and fields must be those of :mod:`preemptible.core.schema`."""
        check_event(event, fields)
        record = {
            "event": event,
            "time": time.time(),
            "job_id": self.env.job_id,
            "restart_count": self.env.restart_count,
            "host": self.env.host,
            "rank": self.rank,
            "pid": os.getpid(),
        }
        record.update(fields)
        line = (json.dumps(record, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

