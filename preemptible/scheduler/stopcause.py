"""Was this SLURM job cancelled? The stop-cause decision as a function and a command without the CLI.

For code that decides about a requeue *outside* the training process (a batch shell whose ``srun``
exited, a supervisor): the same rules the session applies at its stop (:mod:`preemptible.core.cause`).

::

    from preemptible.scheduler.stopcause import is_cancelled
    if is_cancelled() is False: ...          # this job ($SLURM_JOB_ID) was not scancel'ed: safe to requeue

    # in a batch script (no Lightning or torch import; about 0.1 s plus the squeue call):
    python -m preemptible.scheduler.stopcause is-cancelled   # exit 0: cancelled, 1: not, 2: cannot tell
    python -m preemptible.scheduler.stopcause verdict        # one JSON line: cause, action, detail

``--job JOB`` and ``--restart-count N`` override ``$SLURM_JOB_ID`` and ``$SLURM_RESTART_COUNT`` (the count
at the attempt's start, which tells "SLURM requeued it already" apart). Locally (no SLURM), a stop
request left by ``preemptible run`` (``$PREEMPTIBLE_STOP_REQUEST``) means cancelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Optional, Sequence

from preemptible.core.cause import QUERY_TIMEOUT, Action, StopVerdict, decide
from preemptible.core.environment import JobEnvironment
from preemptible.core.schema import StopCauseName

__all__ = ["is_cancelled", "stop_verdict"]


def stop_verdict(job_id: Optional[str] = None, restart_count: Optional[int] = None,
                 timeout: float = QUERY_TIMEOUT) -> StopVerdict:
    """The verdict for a stop of this job now (``job_id``/``restart_count`` default to the environment's)."""
    env = JobEnvironment.from_env()
    if job_id is not None:
        env = replace(env, slurm_job_id=job_id)
    if restart_count is not None:
        env = replace(env, slurm_restart_count=restart_count)
    return decide(env, stop_reason="signal", timeout=timeout)


def is_cancelled(job_id: Optional[str] = None, restart_count: Optional[int] = None,
                 timeout: float = QUERY_TIMEOUT) -> Optional[bool]:
    """``True``: the job is being cancelled (``scancel``, ``job.cancel()``, Ctrl-C to ``preemptible run``): do not
    requeue. ``False``: it is not. ``None``: the scheduler did not answer (the session then requeues)."""
    verdict = stop_verdict(job_id, restart_count, timeout)
    if verdict.cause == StopCauseName.UNKNOWN:
        return None
    return verdict.action == Action.END


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preemptible.scheduler.stopcause",
                                     description="Was this job cancelled? (the stop-cause rules of preemptible)")
    parser.add_argument("question", choices=("is-cancelled", "verdict"))
    parser.add_argument("--job", default=None, help="the SLURM job id (default: $SLURM_JOB_ID)")
    parser.add_argument("--restart-count", type=int, default=None,
                        help="SLURM_RESTART_COUNT at the attempt's start (default: $SLURM_RESTART_COUNT, unset = 0)")
    parser.add_argument("--timeout", type=float, default=QUERY_TIMEOUT, help="seconds to wait for squeue")
    args = parser.parse_args(argv)
    verdict = stop_verdict(args.job, args.restart_count, args.timeout)
    if args.question == "verdict":
        print(json.dumps(verdict.to_json()))
        return 0
    print(f"{verdict.cause}: {verdict.detail}")
    if verdict.cause == StopCauseName.UNKNOWN:
        return 2
    return 0 if verdict.action == Action.END else 1


if __name__ == "__main__":
    sys.exit(main())
