"""The run directory: where a run's checkpoints, record and journal live across requeues.

Resolution order for the directory: the explicit argument, ``$PREEMPTIBLE_RUN_DIR``, then
``runs/<SLURM_JOB_ID>`` under SLURM (the job id survives requeues), else a clear error — a run
directory picked silently from the time or a random id would make every restart a fresh start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from preemptible.core.environment import JobEnvironment
from preemptible.core.fsutil import atomic_write_json, read_json
from preemptible.core.journal import Journal
from preemptible.core.store import CheckpointStore


class RunDirError(RuntimeError):
    """The run directory cannot be determined or used."""


def resolve_run_dir(run_dir: str | os.PathLike[str] | None = None, env: JobEnvironment | None = None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    env = env or JobEnvironment.from_env()
    if env.run_dir:
        return Path(env.run_dir)
    if env.under_slurm and env.requeue_job_id:
        return Path("runs") / env.requeue_job_id
    raise RunDirError(
        "preemptible does not know where this run keeps its checkpoints. Pass "
        "run_dir='runs/my-experiment' (to PreemptionCallback or PreemptionSession) or export PREEMPTIBLE_RUN_DIR; "
        "the same directory must be given to every restart of the run."
    )


class RunDirectory:
    """Paths and small records of one run.

    Attributes:
        path: the run directory.
        store: the :class:`~preemptible.core.store.CheckpointStore` under ``checkpoints/``.
        journal: the :class:`~preemptible.core.journal.Journal` in ``events.jsonl``.
    """

    def __init__(self, path: str | os.PathLike[str], keep: int = 2, env: JobEnvironment | None = None,
                 checksum: str = "crc32") -> None:
        self.path = Path(path)
        self.env = env or JobEnvironment.from_env()
        self.store = CheckpointStore(self.path / "checkpoints", keep=keep, checksum=checksum)
        self.journal = Journal(self.path / "events.jsonl", env=self.env)

    @property
    def record_path(self) -> Path:
        return self.path / "run.json"

    def check_usable(self) -> None:
        """Raise :class:`RunDirError` naming the problem and the fix when this process cannot keep the run here.

        Checked before anything is written: a path that is a file, a directory (or the nearest existing
        parent of one still to be made) that this user cannot write, a read-only filesystem. Nothing is
        created or changed by the check.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run_dir {path} is a file, not a directory. Pass the path of a directory (a new one "
                              "for a new run); the file is left as it is.")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise RunDirError(f"run_dir {path} cannot be created: {existing} is a file, not a directory. Choose a "
                              "run_dir under a directory.")
        if not os.access(existing, os.W_OK | os.X_OK):
            if _read_only_filesystem(existing):
                problem = f"{existing} is on a read-only filesystem"
            else:
                problem = f"{existing} is not writable by this user (uid {os.getuid()})"
            raise RunDirError(f"run_dir {path} cannot be used: {problem}. Point run_dir at a writable directory on a "
                              "filesystem every restart of the job sees, or fix its permissions; nothing was changed.")

    def create(self) -> None:
        # 0700: whoever can write here can make the next restart load their pickle (see README's trust model).
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def read_record(self) -> dict[str, Any]:
        try:
            data = read_json(self.record_path)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def update_record(self, **changes: Any) -> dict[str, Any]:
        """Read-modify-write of ``run.json`` (global rank 0 only; atomic replace)."""
        record = self.read_record()
        record.setdefault("created", time.time())
        record.update(changes)
        self.create()
        atomic_write_json(self.record_path, record)
        return record

    def requeues_so_far(self) -> int:
        """Requeues already spent: the larger of SLURM's restart count and the run's own count.

        SLURM's count includes the requeues after a crash, which have their own budget (``crash_requeues``).
        """
        record = self.read_record()
        return max(self.env.restart_count - int(record.get("crash_requeues", 0)), int(record.get("requeues", 0)))


class ProgressFile:
    """``<run_dir>/progress.json``: the latest step, for ``preemptible run``/``status`` while the job runs.

    Written by global rank 0 at most every ``$PREEMPTIBLE_PROGRESS_INTERVAL`` seconds (default 1;
    ``preemptible run --preempt-at-step`` sets 0 to follow every step). No fsync: it is a hint.
    """

    def __init__(self, path: Path, interval: float | None = None) -> None:
        self.path = path
        self.interval = JobEnvironment.from_env().progress_interval if interval is None else interval
        self._last = 0.0

    def report(self, step: int, epoch: int, force: bool = False) -> bool:
        """Write the file if due; returns whether it was written (callers piggyback heartbeats on it)."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return False
        self._last = now
        tmp = self.path.with_name(f".tmp-progress.{os.getpid()}")
        try:
            tmp.write_text(f'{{"step": {step}, "epoch": {epoch}, "time": {time.time()}, "pid": {os.getpid()}}}')
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full disk must not stop training over a hint file
        return True


def read_progress(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = read_json(Path(run_dir) / "progress.json")
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
