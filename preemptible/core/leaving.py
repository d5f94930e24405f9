"""How a stopped run leaves: why it stopped, whether it comes back, and the exit every rank takes.

The session calls :func:`decide_cause` once at every agreed stop (after the checkpoint is
committed) and :func:`leave` when the adapter is ready to go. Both run on every rank and keep the
ranks together: rank 0 asks the scheduler and requeues; the others learn its answer through the
agreement and raise the same exception with the same exit code:

* :class:`~preemptible.core.exit.Cancelled` (``scancel``, Ctrl-C to ``preemptible run``): no requeue;
* :class:`~preemptible.core.exit.RequeueLimitReached`: the requeue budget is used up (exit 1);
* :class:`~preemptible.core.requeue.RequeueError` on rank 0: the request failed (exit 1);
* :class:`~preemptible.core.exit.Preempted` otherwise (exit :data:`~preemptible.REQUEUE_EXIT_CODE`).
"""

from __future__ import annotations

from typing import Callable, NoReturn, Optional

from preemptible.core import cause as stop_cause
from preemptible.core.agreement import StopAgreement
from preemptible.core.environment import JobEnvironment
from preemptible.core.exit import Cancelled, Preempted, RequeueLimitReached
from preemptible.core.policy import Stopped
from preemptible.core.requeue import RequeueBackend, RequeueError, RequeueOutcome
from preemptible.core.rundir import RunDirectory
from preemptible.core.schema import Event, RequeueOutcomeName, RunRecordKey, RunStatus
from preemptible.core.signals import SignalRecorder


def decide_cause(run: RunDirectory, env: JobEnvironment, agreement: StopAgreement, signals: SignalRecorder,
                 rank: int, step: int, reason: str) -> stop_cause.StopVerdict:
    """Every rank, at the agreed stop: global rank 0 asks the scheduler why, every rank gets its answer.

    Asked here, never in the signal handler, and once per stop: the controller's state is final
    tens of milliseconds after the signal, and a controller that does not answer costs at most
    :data:`~preemptible.core.cause.QUERY_TIMEOUT` seconds (then the run is requeued, the safe side).
    """
    answer = None
    if rank == 0:
        note = signals.note
        verdict = stop_cause.decide(env, reason, signal_at=note.first_at if note else None)
        answer = verdict.to_json()
        run.journal.append(Event.STOP_CAUSE, step=step, cause=verdict.cause, action=verdict.action,
                           detail=verdict.detail)
        run.update_record(**{RunRecordKey.LAST_STOP_CAUSE: verdict.cause})
    return stop_cause.StopVerdict.from_json(agreement.broadcast(answer))


def leave(stop: Stopped, verdict: Optional[stop_cause.StopVerdict], *, run: RunDirectory, backend: RequeueBackend,
          env: JobEnvironment, rank: int, max_requeues: Optional[int], before_exit: Callable[[], None]) -> NoReturn:
    """Every rank: ask for the requeue (rank 0) and raise the exception this stop ends with (see the module).

    ``before_exit`` runs right before the exception (the Lightning adapter lets the rank processes
    it launched exit first).
    """
    step, path = stop.step, str(stop.checkpoint) if stop.checkpoint else None
    if verdict is not None and not verdict.requeue:
        _leave_cancelled(run, rank, step, path, verdict, before_exit)
    if stop.over_limit:
        # Every rank exits 1, so that no supervisor (srun takes the highest exit code) sees a requeue request.
        message = (f"preemptible: requeue limit reached ({max_requeues} requeues used). Not requeueing; "
                   f"the checkpoint at step {step} is kept ({path}). Resubmit by hand to continue, or raise "
                   "max_requeues / PREEMPTIBLE_MAX_REQUEUES.")
        if rank == 0:
            run.journal.append(Event.REQUEUE, backend=backend.name, outcome=RequeueOutcomeName.LIMIT_REACHED, step=step)
            run.update_record(**{RunRecordKey.STATUS: RunStatus.REQUEUE_LIMIT})
            print(message, flush=True)
        run.journal.append(Event.EXIT, code=1, reason="requeue_limit", step=step)
        before_exit()
        raise RequeueLimitReached(message)
    if rank == 0:
        try:
            outcome = _request_requeue(backend, env, verdict)
        except RequeueError as exc:
            run.journal.append(Event.REQUEUE, backend=backend.name, outcome=RequeueOutcomeName.FAILED,
                               error=str(exc), step=step)
            run.update_record(**{RunRecordKey.STATUS: RunStatus.REQUEUE_FAILED})
            run.journal.append(Event.EXIT, code=exc.code, reason="requeue_failed", step=step)
            print(f"preemptible: {exc}", flush=True)
            before_exit()
            raise
        record = run.read_record()
        counted = outcome.requested or outcome.delegated
        run.update_record(**{RunRecordKey.STATUS: RunStatus.PREEMPTED,
                             RunRecordKey.REQUEUES: int(record.get(RunRecordKey.REQUEUES, 0)) + int(counted),
                             RunRecordKey.LAST_PREEMPTED_STEP: step})
        name = (RequeueOutcomeName.DELEGATED if outcome.delegated else
                RequeueOutcomeName.REQUESTED if outcome.requested else RequeueOutcomeName.NONE)
        run.journal.append(Event.REQUEUE, backend=outcome.backend, detail=outcome.detail, step=step, outcome=name)
    preempted = Preempted(step=step, checkpoint=path, reason=stop.reason)
    run.journal.append(Event.EXIT, code=preempted.code, reason=stop.reason, step=step)
    print(f"preemptible: rank {rank} {preempted}", flush=True)
    before_exit()
    raise preempted


def _request_requeue(backend: RequeueBackend, env: JobEnvironment,
                     verdict: Optional[stop_cause.StopVerdict]) -> RequeueOutcome:
    if verdict is not None and verdict.action == stop_cause.Action.ALREADY_REQUEUED and backend.name != "none":
        # `scontrol requeue` by an operator, or the end of a preemption's grace time: a second request would fail.
        return RequeueOutcome(backend.name, True, f"SLURM already requeued the job ({verdict.cause})")
    return backend.request(env)


def _leave_cancelled(run: RunDirectory, rank: int, step: Optional[int], path: Optional[str],
                     verdict: stop_cause.StopVerdict, before_exit: Callable[[], None]) -> NoReturn:
    """Every rank: the stop was a cancellation; no requeue (the checkpoint stays for a deliberate resubmission)."""
    cancelled = Cancelled(step=step, checkpoint=path, reason=verdict.cause)
    if rank == 0:
        run.update_record(**{RunRecordKey.STATUS: RunStatus.CANCELLED})
    run.journal.append(Event.EXIT, code=cancelled.code, reason=verdict.cause, step=step)
    print(f"preemptible: rank {rank} {cancelled}" + (" (resubmit the same command to resume)" if path else ""),
          flush=True)
    before_exit()
    raise cancelled
