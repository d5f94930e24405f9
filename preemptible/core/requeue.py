"""Requeue backends: how a preempted job gets started again.

Exactly one process (global rank 0) asks for the requeue, after every rank has committed its
part of the checkpoint. The backend is chosen from the environment when ``requeue="auto"``:

* ``slurm``: ``scontrol requeue <job>`` (``ARRAYID_TASKID`` for array tasks). Needed because a
  job that exits by itself during the grace period is *not* requeued by SLURM.
* ``submitit``: as submitit would (``scontrol requeue`` on SLURM, the exit code 144 that its
  ``LocalExecutor`` relaunches on), after every rank has saved (see :mod:`preemptible.scheduler.submitit`).
* ``local``: nothing to call; the exit code :data:`~preemptible.REQUEUE_EXIT_CODE` tells
  ``preemptible run`` (or submitit's ``LocalExecutor``) to relaunch.
* ``none``: never requeue (the checkpoint is still written).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from preemptible.core.environment import JobEnvironment

BACKENDS = ("auto", "slurm", "submitit", "local", "none")


class RequeueError(SystemExit):
    """The requeue request failed; the checkpoint is committed, so resubmitting by hand resumes."""

    def __init__(self, message: str) -> None:
        super().__init__(1)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class RequeueOutcome:
    backend: str
    requested: bool
    detail: str = ""
    #: nothing was requested, but the batch shell of the sbatch templates will requeue after the step
    delegated: bool = False


class RequeueBackend:
    name = "none"

    def request(self, env: JobEnvironment) -> RequeueOutcome:
        return RequeueOutcome(self.name, False, "requeue disabled")


class LocalRequeue(RequeueBackend):
    """Nothing to call: the supervisor relaunches on the exit code."""

    name = "local"

    def request(self, env: JobEnvironment) -> RequeueOutcome:
        return RequeueOutcome(self.name, True, "exit code asks the supervisor to relaunch")


class SubmititRequeue(RequeueBackend):
    """A submitit job: ``scontrol requeue`` when it runs on SLURM, the exit code under ``LocalExecutor``.

    submitit's own handler would requeue from inside the signal handler on rank 0 only; preemptible
    replaces it during ``fit`` and requeues the same way submitit does, once every rank has saved.
    """

    name = "submitit"

    def request(self, env: JobEnvironment) -> RequeueOutcome:
        inner = SlurmRequeue() if env.under_slurm else LocalRequeue()
        outcome = inner.request(env)
        return RequeueOutcome(self.name, outcome.requested, f"{inner.name}: {outcome.detail}", outcome.delegated)


class SlurmRequeue(RequeueBackend):
    """``scontrol requeue`` of this job.

    Args:
        scontrol: the command (name on ``PATH`` or a path).
        timeout: seconds to wait for ``scontrol``; the controller may be busy but must not eat the grace period.
    """

    name = "slurm"

    def __init__(self, scontrol: str = "scontrol", timeout: float = 30.0) -> None:
        self.scontrol = scontrol
        self.timeout = timeout

    def request(self, env: JobEnvironment) -> RequeueOutcome:
        job = env.requeue_job_id
        if not job:
            raise RequeueError("requeue='slurm' but SLURM_JOB_ID is not set: this process is not a SLURM job step")
        exe = shutil.which(self.scontrol)
        if exe is None and env.shell_requeues:
            # A container without SLURM's tools (pyxis/enroot, Apptainer): the batch shell of our templates runs
            # outside it and requeues once the step has exited with the requeue code.
            return RequeueOutcome(self.name, False, f"'{self.scontrol}' is not on PATH in this container: the batch "
                                  "shell requeues the job after the step", delegated=True)
        if exe is None:
            raise RequeueError(
                f"cannot requeue SLURM job {job}: '{self.scontrol}' is not on PATH. The checkpoint is committed; "
                "resubmit the same script by hand to resume, and make scontrol available on compute nodes."
            )
        try:
            done = subprocess.run([exe, "requeue", job], capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise RequeueError(f"'scontrol requeue {job}' did not answer within {self.timeout:.0f} s; "
                               "the checkpoint is committed, resubmit to resume") from None
        message = (done.stderr.strip() or done.stdout.strip())
        if done.returncode != 0 and "pending execution" in message.lower():
            # SLURM already requeued the job (an operator's `scontrol requeue`, or a preemption with
            # PreemptMode=REQUEUE got there first): that is the outcome we wanted.
            return RequeueOutcome(self.name, True, f"job {job} was already requeued ({message})")
        if done.returncode != 0:
            raise RequeueError(
                f"'scontrol requeue {job}' failed (exit {done.returncode}): {message}. "
                "The checkpoint is committed; check that the job was submitted with --requeue (and that the "
                "cluster allows requeue: JobRequeue=1), then resubmit to resume."
            )
        return RequeueOutcome(self.name, True, f"scontrol requeue {job}")


def select_backend(requeue: str | RequeueBackend, env: JobEnvironment) -> RequeueBackend:
    """Pick the backend for ``requeue`` ("auto" looks at the environment)."""
    if isinstance(requeue, RequeueBackend):
        return requeue
    if requeue not in BACKENDS:
        raise ValueError(f"requeue={requeue!r}: choose one of {', '.join(BACKENDS)} or pass a RequeueBackend")
    if requeue == "auto":
        requeue = "submitit" if env.under_submitit else "slurm" if env.under_slurm else "local"
    backends: dict[str, type[RequeueBackend]] = {"slurm": SlurmRequeue, "submitit": SubmititRequeue, "local": LocalRequeue,
                                                 "none": RequeueBackend}
    return backends[requeue]()
