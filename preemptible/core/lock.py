"""One job per run directory: a lock file with stale-lock detection.

Two jobs writing checkpoints into the same run directory would prune each other's checkpoints and
resume from each other's steps. The first job's global rank 0 holds ``<run_dir>/lock.json``
(host, pid, job id, time) and touches it as training progresses; a second job gets a clear error.
A lock is *stale*, and taken over, when its holder is provably gone:

* same host and its pid no longer exists (killed, crashed, SIGKILLed after a preemption);
* the same SLURM job id (a requeued attempt of this very job, possibly on another node);
* no heartbeat for ``stale_after`` seconds (a holder on another host that died with its node).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from preemptible.core.fsutil import pid_alive


class RunLockedError(RuntimeError):
    """Another live job holds the run directory."""


class RunLock:
    """``<run_dir>/lock.json``, held by one process (global rank 0 of one job).

    Args:
        run_dir: the run directory.
        job_id: this job's scheduler id (``None`` outside a scheduler).
        stale_after: seconds without a heartbeat after which a lock on another host counts as abandoned.
    """

    def __init__(self, run_dir: str | os.PathLike[str], job_id: Optional[str] = None, stale_after: float = 900.0) -> None:
        self.path = Path(run_dir) / "lock.json"
        self.job_id = job_id
        self.stale_after = stale_after
        self.held = False

    def _mine(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": self.job_id, "time": time.time()}

    def owner(self) -> Optional[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn or unreadable: judged by its age alone

    def _stale_reason(self, owner: dict[str, Any]) -> Optional[str]:
        host, pid = owner.get("host"), owner.get("pid")
        if host == socket.gethostname() and isinstance(pid, int):
            if pid == os.getpid():
                return "held by this process"
            if not pid_alive(pid):
                return f"its holder (pid {pid}) is gone"
        if self.job_id is not None and owner.get("job_id") == self.job_id:
            return f"it belongs to an earlier attempt of job {self.job_id}"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it disappeared"
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns why an old lock was taken over (``None`` if there was none)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                owner = self.owner()
                if owner is None:
                    continue  # released meanwhile: try again
                reason = self._stale_reason(owner)
                if reason is None:
                    raise RunLockedError(
                        f"run directory {self.path.parent} is in use by another job (host {owner.get('host')}, "
                        f"pid {owner.get('pid')}, job {owner.get('job_id')}, heartbeat "
                        f"{time.time() - self.path.stat().st_mtime:.0f} s ago). Give this job its own run_dir; if "
                        f"that job is really gone, delete {self.path} (it is taken over automatically after "
                        f"{self.stale_after:.0f} s without a heartbeat)."
                    ) from None
                self._write()
                self.held = True
                return reason
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(self._mine(), f)
                self.held = True
                return None
        raise RunLockedError(f"could not take {self.path}: it keeps changing hands; is another job starting on it?")

    def _write(self) -> None:
        tmp = self.path.with_name(f".tmp-lock.{os.getpid()}")
        tmp.write_text(json.dumps(self._mine()))
        os.replace(tmp, self.path)

    def heartbeat(self) -> None:
        if self.held:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self._write()  # someone removed it by hand while we run: put it back

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self.owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
