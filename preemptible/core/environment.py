"""What the job scheduler tells this process, read from explicit environment variables.

Kept free of Lightning and torch so that every other module (and a non-Lightning trainer) can use
it. Variables read: ``SLURM_JOB_ID``, ``SLURM_ARRAY_JOB_ID``/``SLURM_ARRAY_TASK_ID``,
``SLURM_RESTART_COUNT``, ``SLURM_PROCID``, ``RANK``, ``SUBMITIT_FOLDER``, ``PREEMPTIBLE_RUN_DIR``,
``PREEMPTIBLE_MAX_REQUEUES``, ``PREEMPTIBLE_ATTEMPT`` (set by ``preemptible run``).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class JobEnvironment:
    """A snapshot of the scheduler's view of this process."""

    slurm_job_id: str | None
    slurm_array_job_id: str | None
    slurm_array_task_id: str | None
    slurm_restart_count: int
    global_rank: int
    local_attempt: int
    under_submitit: bool
    host: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "JobEnvironment":
        env = os.environ if env is None else env
        rank = env.get("RANK") or env.get("SLURM_PROCID") or "0"
        return cls(
            slurm_job_id=env.get("SLURM_JOB_ID") or None,
            slurm_array_job_id=env.get("SLURM_ARRAY_JOB_ID") or None,
            slurm_array_task_id=env.get("SLURM_ARRAY_TASK_ID") or None,
            slurm_restart_count=_int(env.get("SLURM_RESTART_COUNT"), 0),
            global_rank=_int(rank, 0),
            local_attempt=_int(env.get("PREEMPTIBLE_ATTEMPT"), 0),
            under_submitit=bool(env.get("SUBMITIT_FOLDER") or env.get("SUBMITIT_EXECUTOR")),
            host=socket.gethostname(),
        )

    @property
    def under_slurm(self) -> bool:
        return self.slurm_job_id is not None

    @property
    def requeue_job_id(self) -> str | None:
        """The id ``scontrol requeue`` needs: ``ARRAYID_TASKID`` for array tasks, else the job id."""
        if self.slurm_array_job_id and self.slurm_array_task_id:
            return f"{self.slurm_array_job_id}_{self.slurm_array_task_id}"
        return self.slurm_job_id

    @property
    def job_id(self) -> str | None:
        return self.requeue_job_id

    @property
    def restart_count(self) -> int:
        """How many times this job was started before (SLURM's count, or the local simulator's)."""
        return max(self.slurm_restart_count, self.local_attempt)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default
