"""What the job scheduler (and the user) tell this process, read from environment variables in one place.

Kept free of Lightning and torch so that every other module (and a non-Lightning trainer) can use
it. No other module of preemptible reads these variables itself:

========================================  ====================================================
variable                                  field
========================================  ====================================================
``SLURM_JOB_ID``                          :attr:`JobEnvironment.slurm_job_id`
``SLURM_ARRAY_JOB_ID``/``_TASK_ID``       :attr:`~JobEnvironment.slurm_array_job_id`, ``..._task_id``
``SLURM_RESTART_COUNT``                   :attr:`~JobEnvironment.slurm_restart_count`
``SLURM_STEP_ID``                         :attr:`~JobEnvironment.slurm_step_id` (the job step this process runs in)
``SLURMD_NODENAME``                       :attr:`~JobEnvironment.slurm_node_name` (part of :attr:`~JobEnvironment.host_identity`)
``RANK``, else ``SLURM_PROCID``           :attr:`~JobEnvironment.global_rank`
``LOCAL_RANK``, else ``SLURM_LOCALID``    :attr:`~JobEnvironment.local_rank`
``SUBMITIT_FOLDER``/``SUBMITIT_EXECUTOR`` :attr:`~JobEnvironment.under_submitit`, :attr:`~JobEnvironment.in_submitit_sbatch`
``PREEMPTIBLE_ATTEMPT``                   :attr:`~JobEnvironment.local_attempt` (set by ``preemptible run``)
``PREEMPTIBLE_RUN_DIR``                   :attr:`~JobEnvironment.run_dir`
``PREEMPTIBLE_MAX_REQUEUES``              :attr:`~JobEnvironment.max_requeues`
``PREEMPTIBLE_MAX_CRASH_REQUEUES``        :attr:`~JobEnvironment.max_crash_requeues`
``PREEMPTIBLE_SHELL_REQUEUES``            :attr:`~JobEnvironment.shell_requeues` (``1``: set by the sbatch templates)
``PREEMPTIBLE_SIGNAL_LEAD``               :attr:`~JobEnvironment.signal_lead` (set by the sbatch templates)
``PREEMPTIBLE_PROGRESS_INTERVAL``         :attr:`~JobEnvironment.progress_interval` (seconds, default 1)
``PREEMPTIBLE_PROGRESS_EVENT_SECONDS``    :attr:`~JobEnvironment.progress_event_seconds` (default 30)
``PREEMPTIBLE_STOP_REQUEST``              :attr:`~JobEnvironment.stop_request` (set by ``preemptible run``)
``TORCHELASTIC_RUN_ID``                   :attr:`~JobEnvironment.torchelastic_run_id` (set by torchrun for its workers)
``TORCHELASTIC_SIGNALS_TO_HANDLE``        :attr:`~JobEnvironment.torchelastic_signals` (torchrun's ``--signals-to-handle``)
``PREEMPTIBLE_PEER_TIMEOUT``              :attr:`~JobEnvironment.peer_timeout` (seconds; 0 turns the watchdog off)
``PREEMPTIBLE_INJECT``                    :attr:`~JobEnvironment.inject` (testing: faults, see ``core/inject.py``)
========================================  ====================================================
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
    local_rank: int = 0
    run_dir: str | None = None
    max_requeues: str | None = None  # as written: SessionConfig parses it, with a clear error, when it is used
    signal_lead: float | None = None
    progress_interval: float = 1.0
    progress_event_seconds: float = 30.0
    #: where ``preemptible run`` notes that it was asked to stop (Ctrl-C/SIGTERM) before it signals the run
    stop_request: str | None = None
    torchelastic_run_id: str | None = None
    torchelastic_signals: str | None = None  # as torchrun exported it ("SIGTERM,SIGINT,..."); None: not exported
    max_crash_requeues: str | None = None  # as written, like max_requeues
    #: the batch shell of our templates requeues the job itself after the step when the ranks cannot
    shell_requeues: bool = False
    peer_timeout: str | None = None  # as written: SessionConfig parses it, with a clear error, when it is used
    inject: str | None = None
    slurm_step_id: str | None = None  # as SLURM wrote it; see :attr:`slurm_step`
    slurm_node_name: str | None = None
    submitit_executor: str | None = None  # SUBMITIT_EXECUTOR: "slurm" in submitit's own sbatch script, "local"

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
            submitit_executor=env.get("SUBMITIT_EXECUTOR") or None,
            host=socket.gethostname(),
            local_rank=_int(env.get("LOCAL_RANK") or env.get("SLURM_LOCALID"), 0),
            run_dir=env.get("PREEMPTIBLE_RUN_DIR") or None,
            max_requeues=env.get("PREEMPTIBLE_MAX_REQUEUES") or None,
            signal_lead=_float(env.get("PREEMPTIBLE_SIGNAL_LEAD"), None),
            progress_interval=_float(env.get("PREEMPTIBLE_PROGRESS_INTERVAL"), 1.0) or 0.0,
            progress_event_seconds=_float(env.get("PREEMPTIBLE_PROGRESS_EVENT_SECONDS"), 30.0) or 0.0,
            stop_request=env.get("PREEMPTIBLE_STOP_REQUEST") or None,
            torchelastic_run_id=env.get("TORCHELASTIC_RUN_ID") or None,
            torchelastic_signals=env.get("TORCHELASTIC_SIGNALS_TO_HANDLE"),
            max_crash_requeues=env.get("PREEMPTIBLE_MAX_CRASH_REQUEUES") or None,
            shell_requeues=env.get("PREEMPTIBLE_SHELL_REQUEUES") == "1",
            peer_timeout=env.get("PREEMPTIBLE_PEER_TIMEOUT") or None,
            inject=env.get("PREEMPTIBLE_INJECT") or None,
            slurm_step_id=env.get("SLURM_STEP_ID") or None,
            slurm_node_name=env.get("SLURMD_NODENAME") or None,
        )

    @property
    def is_global_zero(self) -> bool:
        """Global rank 0 (local rank 0 of node 0): the process that writes run-wide records."""
        return self.global_rank == 0 and self.local_rank == 0

    @property
    def under_elastic_agent(self) -> bool:
        """Started by torchrun (``torch.distributed.run``): its elastic agent stands between the scheduler and this rank."""
        return self.torchelastic_run_id is not None

    @property
    def under_slurm(self) -> bool:
        return self.slurm_job_id is not None

    @property
    def in_submitit_sbatch(self) -> bool:
        """A task of a SLURM job that submitit's own sbatch script started (nothing runs after its ``srun``).

        Not a job of our templates (their batch shell decides after the step: ``shell_requeues``), even one
        submitted from inside a submitit job (it inherits ``SUBMITIT_*``), nor a ``LocalExecutor`` task
        that happens to run inside a SLURM allocation.
        """
        return self.under_slurm and self.submitit_executor == "slurm" and not self.shell_requeues

    @property
    def host_identity(self) -> str:
        """The machine this process runs on, as told apart by processes that compare it: ``host`` or ``host/node``.

        The SLURM node name is part of it because several nodes may share one host name (containers started
        with the same ``--hostname``, or two ``slurmd`` on one machine as in our test cluster): two processes
        with the same identity are on one node, so one can see (and kill) the other's pid.
        """
        return f"{self.host}/{self.slurm_node_name}" if self.slurm_node_name else self.host

    @property
    def slurm_step(self) -> str | None:
        """``JOBID.STEPID`` of the SLURM job step (an ``srun``) this process is a task of, for ``scancel``; else ``None``.

        ``None`` in the batch shell itself and in SLURM's special steps (``batch``, ``extern``, the interactive
        step: ids from 0xfffffff0 up), which must never be cancelled for a training step's sake.
        """
        step = self.slurm_step_id
        if not self.slurm_job_id or not step or not step.isdigit() or int(step) >= 0xFFFFFFF0:
            return None
        return f"{self.slurm_job_id}.{step}"

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


def _float(value: str | None, default: float | None) -> float | None:
    try:
        return float(value) if value else default  # None or "": the default
    except ValueError:
        return default
