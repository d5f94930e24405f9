"""Crashes without warning: tell a crash from a failure of the training code, and decide what comes next.

A rank that is SIGKILLed (OOM killer), segfaults, or whose node vanishes cannot write anything; a
rank whose *training code* raises can. The rule, applied once per ended attempt by whoever
supervises it (the batch shell of the sbatch templates through :mod:`preemptible.scheduler.afterstep`,
``preemptible run``, the submitit task):

* exit 0: finished. Exit :data:`~preemptible.REQUEUE_EXIT_CODE`: a checkpoint for requeue (the
  ranks requeued, or delegated the requeue to the batch shell: :attr:`RequeueOutcomeName.DELEGATED`).
* An exit the session chose (it journaled :attr:`Event.EXIT` with that code: the requeue limit, a
  failed requeue request, a cancellation) is final: :attr:`CrashDecision.LEFT_ON_PURPOSE`.
* Any other exit is a **failure of the training code**, final and not retried, when a rank of that
  attempt journaled :attr:`Event.FAILURE` of kind :attr:`FailureKind.USER` (the session does it in
  :meth:`~preemptible.core.session.PreemptionSession.abandon`, before the process exits): an exception
  in ``training_step`` would only repeat. It is final too when the attempt died before the session
  journaled its start (imports, arguments, set-up): nothing to resume, and most likely deterministic.
* Otherwise it is a **crash** (a death by signal, an OOM kill, a segfault, a lost node, a rank that
  left on a dead or frozen peer, whose collective error is journaled as :attr:`FailureKind.PEER`):
  the run is requeued and resumes from its newest valid checkpoint, bounded twice:

  - ``max_crash_requeues`` (default :data:`~preemptible.core.config.DEFAULT_MAX_CRASH_REQUEUES`),
    counted in ``run.json`` apart from the preemption requeues of ``max_requeues``;
  - an attempt that crashes without committing any new checkpoint made no progress; a second such
    attempt in a row stops the run: "crash loop at step N: ...".

The decision is journaled (:attr:`Event.CRASH`, rank :data:`SUPERVISOR_RANK`) and kept in ``run.json``
(status, counters, :attr:`RunRecordKey.LAST_FAILURE`), where ``preemptible status`` shows it.
No torch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from preemptible.core.cause import already_requeued, job_being_cancelled, job_state
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import REQUEUE_EXIT_CODE
from preemptible.core.rundir import RunDirectory, read_progress
from preemptible.core.schema import (
    ATTEMPT_OPENERS,
    SUPERVISOR_RANK,
    CrashDecision,
    Event,
    FailureKind,
    RequeueOutcomeName,
    RunRecordKey,
    RunStatus,
    read_events,
)
from preemptible.core.watchdog import is_peer_loss_error

#: Crash requeues a run may use unless ``max_crash_requeues`` or ``$PREEMPTIBLE_MAX_CRASH_REQUEUES`` says otherwise.
DEFAULT_MAX_CRASH_REQUEUES = 3

def failure_kind(exception: BaseException) -> str:
    """:attr:`FailureKind.PEER` for a collective that failed because another rank died or froze, else USER.

    One rule with the peer watchdog: :func:`preemptible.core.watchdog.is_peer_loss_error`.
    """
    return FailureKind.PEER if is_peer_loss_error(exception) else FailureKind.USER


def crash_limit(record: dict[str, Any], env: JobEnvironment) -> int:
    """The run's crash-requeue limit: ``run.json`` (the session writes its config's), else the environment, else the default."""
    for raw in (record.get(RunRecordKey.MAX_CRASH_REQUEUES), env.max_crash_requeues):
        try:
            if raw is not None and int(raw) >= 0:
                return int(raw)
        except (TypeError, ValueError):
            continue
    return DEFAULT_MAX_CRASH_REQUEUES


@dataclass(frozen=True)
class Verdict:
    """What a supervisor does after an attempt: ``requeue`` it (or not), and the line to print."""

    decision: str  # a CrashDecision value, or "finished" / "preempted" (nothing to do)
    requeue: bool
    message: str


def attempt_events(run_dir: Path, job_id: Optional[str], attempt: int) -> list[dict[str, Any]]:
    """The journal's events of one attempt (same job id, same restart count)."""
    return [e for e in read_events(run_dir) if e.get("job_id") == job_id and e.get("restart_count") == attempt]


def decide(run_dir: str | Path, exit_code: int, *, env: Optional[JobEnvironment] = None, cancelled: bool = False,
           log_hint: str = "the job's output") -> Verdict:
    """Decide what follows an attempt of the run in ``run_dir`` that ended with ``exit_code``; journal and record it.

    ``env`` names the attempt (job id and restart count, as the ranks journaled them). ``cancelled``:
    the job is being cancelled (``scancel``), so nothing is requeued whatever the exit code.
    ``log_hint`` names where the attempt's output is, for the messages.
    """
    env = env or JobEnvironment.from_env()
    run = RunDirectory(run_dir, env=env)
    events = attempt_events(run.path, env.job_id, env.restart_count)
    if exit_code == 0:
        return Verdict("finished", False, "")
    if exit_code == REQUEUE_EXIT_CODE:
        delegated = any(e.get("event") == Event.REQUEUE and e.get("outcome") == RequeueOutcomeName.DELEGATED
                        for e in events)
        if cancelled or not delegated:
            return Verdict("preempted", False, "")
        detail = "the ranks could not requeue (no scontrol): the batch shell requeues the job"
        _journal(run, exit_code, _last_step(run, events), None, CrashDecision.SHELL_REQUEUE, detail)
        return Verdict(CrashDecision.SHELL_REQUEUE, True, f"preemptible: {detail}")

    step = _last_step(run, events)
    newest = run.store.committed()
    checkpoint_step = newest[-1].record.step if newest else None
    record = run.read_record()
    user = next((e for e in events if e.get("event") == Event.FAILURE and e.get("kind") == FailureKind.USER), None)
    opened = any(e.get("event") in ATTEMPT_OPENERS for e in events)
    on_purpose = next((e for e in events if e.get("event") == Event.EXIT and e.get("code") == exit_code), None)
    status: Optional[str] = None
    changes: dict[str, Any] = {}
    if cancelled:
        decision, detail = CrashDecision.CANCELLED, f"exit {exit_code} while the job is being cancelled: not requeued"
    elif on_purpose is not None:
        # The session's own status (requeue limit, requeue failed, cancelled) stays as it wrote it.
        decision = CrashDecision.LEFT_ON_PURPOSE
        detail = (f"the run left on purpose with exit {exit_code} ({on_purpose.get('reason')}) at step "
                  f"{on_purpose.get('step')}: not a crash, not requeued")
    elif user is not None:
        decision, status = CrashDecision.FAILED, RunStatus.FAILED
        detail = (f"training failed at step {user.get('step')} with an error in the training code (rank "
                  f"{user.get('rank')}): {user.get('error')}. Not retried: it would fail the same way; see {log_hint}")
    elif not opened:
        decision, status = CrashDecision.FAILED, RunStatus.FAILED
        detail = (f"the attempt exited with {exit_code} before training was set up (imports, arguments, "
                  f"set-up): not retried; see {log_hint}")
    else:
        progressed = any(e.get("event") == Event.CHECKPOINT for e in events)
        without = 0 if progressed else int(record.get(RunRecordKey.CRASHES_WITHOUT_PROGRESS, 0)) + 1
        used, limit = int(record.get(RunRecordKey.CRASH_REQUEUES, 0)), crash_limit(record, env)
        since = f"step {checkpoint_step}" if checkpoint_step is not None else "the start (no checkpoint yet)"
        changes[RunRecordKey.CRASHES_WITHOUT_PROGRESS] = without
        if without >= 2:
            decision, status = CrashDecision.CRASH_LOOP, RunStatus.CRASH_LOOP
            detail = (f"crash loop at step {step}: two attempts in a row crashed (this one with exit {exit_code}) "
                      f"without a new checkpoint since {since}; not requeueing. See {log_hint}")
        elif used >= limit:
            decision, status = CrashDecision.CRASH_LIMIT, RunStatus.CRASH_LIMIT
            detail = (f"crash at step {step} (exit {exit_code}): crash requeue limit reached ({used} of "
                      f"max_crash_requeues={limit}); not requeueing, newest checkpoint at {since}. See {log_hint}")
        else:
            decision, status = CrashDecision.REQUEUE, RunStatus.CRASHED
            changes[RunRecordKey.CRASH_REQUEUES] = used + 1
            detail = (f"crash at step {step} (exit {exit_code}, no error recorded by the training code): requeue "
                      f"{used + 1} of {limit}, resuming from {since}")
    if status is not None:
        changes[RunRecordKey.STATUS] = status
        if decision != CrashDecision.REQUEUE:
            changes[RunRecordKey.LAST_FAILURE] = detail
    if changes:
        run.update_record(**changes)
    _journal(run, exit_code, step, checkpoint_step, decision, detail)
    return Verdict(decision, decision == CrashDecision.REQUEUE, f"preemptible: {detail}")


def _last_step(run: RunDirectory, events: list[dict[str, Any]]) -> Optional[int]:
    """The last step the attempt is known to have reached: progress.json (if this attempt's) or its journal."""
    steps = [e["step"] for e in events if isinstance(e.get("step"), int)]
    started = min((e.get("time", 0.0) for e in events), default=None)
    progress = read_progress(run.path)
    if progress and started is not None and progress.get("time", 0.0) >= started and isinstance(progress.get("step"), int):
        steps.append(progress["step"])
    return max(steps, default=None)


def _journal(run: RunDirectory, exit_code: int, step: Optional[int], checkpoint_step: Optional[int], decision: str,
             detail: str) -> None:
    run.journal.rank = SUPERVISOR_RANK
    run.journal.append(Event.CRASH, exit_code=exit_code, step=step, checkpoint_step=checkpoint_step, decision=decision,
                       detail=detail)


def decide_after_attempt(run_dir: str | Path, exit_code: int, *, env: Optional[JobEnvironment] = None,
                         log_hint: str = "the job's output", squeue_timeout: float = 20.0) -> Verdict:
    """:func:`decide` with the job's state asked from SLURM first: the one flow of every supervisor of an attempt.

    Used by the batch shell after ``srun`` (:mod:`preemptible.scheduler.afterstep`) and by the in-rank
    supervisor under submitit (:class:`preemptible.core.supervisor.RankCrashSupervisor`). A job being
    cancelled is never requeued; one that SLURM has requeued already (a lost node: NODE_FAIL) is not
    requeued a second time (the verdict says so in its message).
    """
    env = env or JobEnvironment.from_env()
    state = job_state(env.slurm_job_id, timeout=squeue_timeout) if env.under_slurm and env.slurm_job_id else None
    verdict = decide(run_dir, exit_code, env=env, cancelled=job_being_cancelled(state, env.slurm_restart_count),
                     log_hint=log_hint)
    if verdict.requeue and already_requeued(state, env.slurm_restart_count):
        message = "\n".join(filter(None, [verdict.message, "preemptible: SLURM has requeued the job already"]))
        return Verdict(verdict.decision, False, message)
    return verdict
