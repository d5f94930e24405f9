"""What the batch shell of the sbatch templates does once the training step has exited.

The templates call, after ``srun``::

    decision=$("$PREEMPTIBLE_PYTHON" -m preemptible.scheduler.afterstep after-step "$status")
    [[ "$decision" == requeue ]] && scontrol requeue "$SLURM_JOB_ID"

It prints ``requeue`` on stdout when the shell must requeue the job, nothing otherwise, and its
reasons on stderr (the job's log). The shell requeues in two cases:

* the step exited with :data:`~preemptible.REQUEUE_EXIT_CODE` and the ranks could not requeue
  themselves (no ``scontrol`` inside a pyxis/enroot or Apptainer container: they journaled
  :attr:`~preemptible.core.schema.RequeueOutcomeName.DELEGATED`), and SLURM has not requeued the job already;
* the step crashed (see :mod:`preemptible.core.crashes` for the rule, its bounds and messages).

Never while the job is being cancelled (``scancel``): :func:`job_being_cancelled` tells that from a
preemption or a time limit by the job's state in ``squeue``. The decision is written once here, in
Python, for both templates (the shell only runs ``scontrol``), and any error in it ends in "no
requeue" with a message: the batch shell must never fail because of it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from preemptible.core.crashes import decide
from preemptible.core.environment import JobEnvironment

#: Job states in which SLURM already has the job back in the queue (or on its way there).
_REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING"})


@dataclass(frozen=True)
class JobState:
    """``squeue -O State,RestartCnt,Reason`` of one job."""

    state: str
    restart_count: int
    reason: str


def job_state(job_id: str, squeue: str = "squeue", timeout: float = 20.0) -> Optional[JobState]:
    """The job's state in ``squeue``, or ``None`` when squeue is missing, fails or no longer lists it."""
    exe = shutil.which(squeue)
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "-h", "-j", job_id, "-O", "State:|,RestartCnt:|,Reason:"], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return None
    line = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""
    parts = [p.strip() for p in line.split("|")]
    if len(parts) < 3 or not parts[0]:
        return None
    try:
        restarts = int(parts[1])
    except ValueError:
        restarts = 0
    return JobState(parts[0], restarts, parts[2])


def job_being_cancelled(state: Optional[JobState], restart_count: int) -> bool:
    """Whether the job is ending because someone cancelled it (``scancel``), not preempted, requeued or out of time.

    ``scancel`` leaves the job CANCELLED (COMPLETING while its processes go) with its restart count
    unchanged and a reason other than ``TimeLimit``; a requeue raises the restart count or puts the job
    back to PENDING. The one place this rule lives (the session's handling of ``scancel`` uses the same).
    """
    if state is None:
        return False
    if state.state.startswith("CANCELLED"):
        return True
    return (state.state == "COMPLETING" and state.restart_count == restart_count
            and "timelimit" not in state.reason.replace(" ", "").lower())


def already_requeued(state: Optional[JobState], restart_count: int) -> bool:
    return state is not None and (state.restart_count > restart_count or state.state in _REQUEUED_STATES)


def after_step(exit_code: int, env: Optional[JobEnvironment] = None) -> bool:
    """Decide for the batch shell; True when it must run ``scontrol requeue``. Messages go to stderr."""
    env = env or JobEnvironment.from_env()
    if exit_code == 0:
        return False
    if env.run_dir is None:
        print("preemptible: PREEMPTIBLE_RUN_DIR is not set; no decision after the step", file=sys.stderr)
        return False
    state = job_state(env.slurm_job_id) if env.slurm_job_id else None
    cancelled = job_being_cancelled(state, env.slurm_restart_count)
    verdict = decide(env.run_dir, exit_code, env=env, cancelled=cancelled,
                     log_hint=f"slurm-{env.slurm_job_id}.out" if env.slurm_job_id else "the job's output")
    if verdict.message:
        print(verdict.message, file=sys.stderr, flush=True)
    if verdict.requeue and already_requeued(state, env.slurm_restart_count):
        print("preemptible: SLURM has requeued the job already", file=sys.stderr, flush=True)
        return False
    return verdict.requeue


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preemptible.scheduler.afterstep",
                                     description="Decide, in the batch shell, whether the job must be requeued after its step.")
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("after-step", help="print 'requeue' when the batch shell must requeue the job")
    step.add_argument("status", type=int, help="the exit status of the training step (srun)")
    args = parser.parse_args(argv)
    try:
        requeue = after_step(args.status)
    except Exception as exc:  # noqa: BLE001 - the batch shell must get an answer, and the log the reason
        print(f"preemptible: could not decide after the step ({type(exc).__name__}: {exc}); not requeueing",
              file=sys.stderr, flush=True)
        return 0
    if requeue:
        print("requeue", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
