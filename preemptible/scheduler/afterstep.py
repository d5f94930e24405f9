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

Never while the job is being cancelled (``scancel``): :func:`preemptible.core.cause.job_being_cancelled`
tells that from a preemption or a time limit by the job's state in ``squeue``. The decision is written once here, in
Python, for both templates (the shell only runs ``scontrol``), and any error in it ends in "no
requeue" with a message: the batch shell must never fail because of it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from preemptible.core.crashes import decide_after_attempt
from preemptible.core.environment import JobEnvironment


def after_step(exit_code: int, env: Optional[JobEnvironment] = None) -> bool:
    """Decide for the batch shell; True when it must run ``scontrol requeue``. Messages go to stderr."""
    env = env or JobEnvironment.from_env()
    if exit_code == 0:
        return False
    if env.run_dir is None:
        print("preemptible: PREEMPTIBLE_RUN_DIR is not set; no decision after the step", file=sys.stderr)
        return False
    # No grace period runs here (the step is over): squeue may take as long as a slow controller needs.
    verdict = decide_after_attempt(env.run_dir, exit_code, env=env, squeue_timeout=20.0,
                                   log_hint=f"slurm-{env.slurm_job_id}.out" if env.slurm_job_id else "the job's output")
    if verdict.message:
        print(verdict.message, file=sys.stderr, flush=True)
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
