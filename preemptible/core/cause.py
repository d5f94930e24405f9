"""Why a run is being stopped, and whether it should come back: one decision at the stop boundary.

A signal alone does not say who sent it: SLURM sends SIGTERM when a user runs ``scancel`` (the job must
end), when an operator runs ``scontrol requeue`` (it comes back by itself), at the end of a time limit
and at a preemption without ``preempt_send_user_signal`` (both must be requeued by us, or the work is
lost). So the session asks the scheduler *once*, at the agreed stop, after the checkpoint is committed
(never in the signal handler), on global rank 0 only, and broadcasts the answer so every rank leaves
alike. The answer is a :class:`StopVerdict`: a :class:`~preemptible.core.schema.StopCauseName` and what
to do (ask for a requeue, nothing because the scheduler already requeued, or end the run).

Under SLURM (:func:`classify_slurm`), from
``squeue -h -j JOB -O 'State:|,RestartCnt:|,PreemptTime:|,Reason:|,TimeLeft:|'``, compared with
``SLURM_RESTART_COUNT`` at the attempt's start (measured on slurm 22.05: the state is final 10–40 ms
after the signal):

=====================================================  =====================  ===================
what the controller says                               cause                  action
=====================================================  =====================  ===================
no answer within the timeout (controller down, ...)    ``unknown``            requeue (safe side)
``RestartCnt`` above the attempt's                     ``requeued_by_operator`` / ``preempted``  already requeued
``RUNNING`` with a ``PreemptTime``                     ``preempted``          requeue
``RUNNING``, little ``TimeLeft``                       ``time_limit``         requeue
``RUNNING`` otherwise (``scancel --signal=USR1``)      ``requested``          requeue
``COMPLETING``/``TIMEOUT`` with ``Reason=TimeLimit``   ``time_limit``         requeue
``COMPLETING``/``CANCELLED``, other reason             ``cancelled``          end
anything else                                          ``unknown``            requeue
=====================================================  =====================  ===================

Locally (:func:`classify_local`) the supervisor (``preemptible run``) writes a stop request file before
it signals the run on Ctrl-C/SIGTERM; the file present means ``cancelled``, absent ``requested`` (a
SIGINT received by the run itself, when it is one of the session's signals, means ``cancelled`` too).

Imports neither torch nor Lightning; :mod:`preemptible.scheduler.stopcause` is the command-line face.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from preemptible.core.environment import JobEnvironment
from preemptible.core.schema import StopCauseName

log = logging.getLogger(__name__)

#: Seconds to wait for ``squeue``: a controller that is down answers only after MessageTimeout (18–20 s
#: measured with MessageTimeout=10), which must not eat the grace period; no answer means "requeue".
QUERY_TIMEOUT = 5.0
SQUEUE_FORMAT = "State:|,RestartCnt:|,PreemptTime:|,Reason:|,TimeLeft:|"
#: SLURM sends the ``--signal`` warning up to 60 s before the lead it was asked for.
WARNING_EARLY_SECONDS = 60.0
#: Without a known lead, a ``RUNNING`` job this close to its limit is taken to be warned of it.
DEFAULT_TIME_LIMIT_WINDOW = 180.0


class Action:
    """What the run does after its checkpoint (values of :attr:`StopVerdict.action`)."""

    REQUEUE = "requeue"  #: ask the backend for a requeue and exit with the requeue code
    ALREADY_REQUEUED = "already_requeued"  #: the scheduler requeued the job itself: exit with the requeue code
    END = "end"  #: no requeue: the run ends (cancelled), its checkpoint kept for a deliberate resubmission


@dataclass(frozen=True)
class StopVerdict:
    """The decision for one stop: why, what to do, and what the scheduler said (for the journal)."""

    cause: str
    action: str
    detail: str = ""

    @property
    def requeue(self) -> bool:
        """Whether the job comes back (requeued by us or by the scheduler)."""
        return self.action != Action.END

    def to_json(self) -> dict[str, str]:
        return {"cause": self.cause, "action": self.action, "detail": self.detail}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> "StopVerdict":
        return cls(cause=data["cause"], action=data["action"], detail=data.get("detail", ""))


@dataclass(frozen=True)
class SlurmJobState:
    """One ``squeue`` answer about a job."""

    state: str
    restart_count: int
    preempt_time: Optional[str]
    reason: str
    time_left_seconds: Optional[float]

    @classmethod
    def parse(cls, line: str) -> "SlurmJobState":
        """``RUNNING|0|None|None|1:23|`` → a state; ``ValueError`` for a line that does not fit."""
        fields = [f.strip() for f in line.strip().split("|")]
        if len(fields) < 5 or not fields[0] or not fields[1].isdigit():
            raise ValueError(f"unexpected squeue answer {line!r}")
        state, restarts, preempt, reason, left = fields[:5]
        return cls(state=state.split()[0].upper(), restart_count=int(restarts),
                   preempt_time=None if preempt.lower() in ("", "none", "n/a", "unknown") else preempt,
                   reason=reason, time_left_seconds=parse_slurm_duration(left))


def parse_slurm_duration(text: str) -> Optional[float]:
    """SLURM's ``[days-]hours:minutes:seconds`` (or ``minutes:seconds``) in seconds; ``None`` for UNLIMITED/N/A."""
    text = text.strip()
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        if not head.isdigit():
            return None
        days = int(head)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return float(days * 86400 + seconds)


def query_slurm(job_id: str, timeout: float = QUERY_TIMEOUT, squeue: str = "squeue") -> SlurmJobState:
    """Ask the controller about ``job_id``; ``RuntimeError`` (with the reason) when it does not answer usefully."""
    exe = shutil.which(squeue)
    if exe is None:
        raise RuntimeError(f"'{squeue}' is not on PATH")
    try:
        done = subprocess.run([exe, "-h", "-j", job_id, "-O", SQUEUE_FORMAT], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"squeue did not answer within {timeout:.0f} s") from None
    except OSError as exc:  # not executable, gone between which() and exec, out of processes
        raise RuntimeError(f"squeue could not be run: {exc}") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"squeue failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[:300]}")
    try:
        return SlurmJobState.parse(lines[0])
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None


#: Job states in which SLURM already has the job back in the queue (or on its way there).
REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING"})


def job_state(job_id: str, timeout: float = QUERY_TIMEOUT, squeue: str = "squeue") -> Optional[SlurmJobState]:
    """:func:`query_slurm`, or ``None`` when squeue is missing, fails or no longer lists the job (never raises)."""
    try:
        return query_slurm(job_id, timeout=timeout, squeue=squeue)
    except RuntimeError:
        return None


def job_being_cancelled(state: Optional[SlurmJobState], restart_count: int) -> bool:
    """Whether the job is ending because someone cancelled it (``scancel``), not preempted, requeued or out of time.

    ``scancel`` leaves the job CANCELLED (COMPLETING while its processes go) with its restart count
    unchanged and a reason other than ``TimeLimit``; a requeue raises the restart count or puts the job
    back to PENDING. The one place this rule lives, for every supervisor of a crashed attempt (the batch
    shell's :mod:`preemptible.scheduler.afterstep`, the in-rank :mod:`preemptible.core.supervisor`).
    """
    if state is None:
        return False
    if state.state.startswith("CANCELLED"):
        return True
    return (state.state == "COMPLETING" and state.restart_count == restart_count
            and "timelimit" not in state.reason.replace(" ", "").lower())


def already_requeued(state: Optional[SlurmJobState], restart_count: int) -> bool:
    """Whether SLURM has put the job back in the queue already (its restart count moved, or it is pending again)."""
    return state is not None and (state.restart_count > restart_count or state.state in REQUEUED_STATES)


def classify_slurm(answer: Optional[SlurmJobState], base_restart_count: int, signal_lead: Optional[float] = None,
                   error: str = "") -> StopVerdict:
    """The decision from the controller's answer (``None``: it did not answer; ``error`` says why)."""
    if answer is None:
        return StopVerdict(StopCauseName.UNKNOWN, Action.REQUEUE,
                           f"the SLURM controller did not answer ({error or 'no answer'}): requeueing to be safe")
    seen = (f"State={answer.state} RestartCnt={answer.restart_count} (attempt started at {base_restart_count}) "
            f"PreemptTime={answer.preempt_time or 'None'} Reason={answer.reason} TimeLeft={answer.time_left_seconds}")
    if answer.restart_count > base_restart_count:
        # An operator's `scontrol requeue`, or the end of a preemption's grace time: SLURM requeued the job already.
        cause = StopCauseName.PREEMPTED if answer.preempt_time else StopCauseName.REQUEUED_BY_OPERATOR
        return StopVerdict(cause, Action.ALREADY_REQUEUED, seen)
    if answer.state == "RUNNING":
        if answer.preempt_time:
            return StopVerdict(StopCauseName.PREEMPTED, Action.REQUEUE, seen)
        window = (signal_lead + WARNING_EARLY_SECONDS + 5.0) if signal_lead else DEFAULT_TIME_LIMIT_WINDOW
        if answer.time_left_seconds is not None and answer.time_left_seconds <= window:
            return StopVerdict(StopCauseName.TIME_LIMIT, Action.REQUEUE, seen)
        return StopVerdict(StopCauseName.REQUESTED, Action.REQUEUE, seen)
    if answer.state in ("COMPLETING", "TIMEOUT") and answer.reason.replace(" ", "").lower() == "timelimit":
        return StopVerdict(StopCauseName.TIME_LIMIT, Action.REQUEUE, seen)
    if answer.state == "TIMEOUT":
        return StopVerdict(StopCauseName.TIME_LIMIT, Action.REQUEUE, seen)
    if answer.state in ("COMPLETING", "CANCELLED"):
        return StopVerdict(StopCauseName.CANCELLED, Action.END, seen)
    return StopVerdict(StopCauseName.UNKNOWN, Action.REQUEUE, seen + ": not a state a stop is expected in; requeueing")


def write_stop_request(path: str | Path, signal_name: str) -> None:
    """The local supervisor's note, written *before* it signals the run: "this stop is a cancellation"."""
    Path(path).write_text(json.dumps({"cause": StopCauseName.CANCELLED, "signal": signal_name, "time": time.time()}))


def classify_local(stop_request: Optional[str]) -> StopVerdict:
    """Outside SLURM: cancelled when the supervisor left its stop request, else a stop to be relaunched."""
    if stop_request:
        path = Path(stop_request)
        if path.exists():
            try:
                note = json.loads(path.read_text())
                detail = f"preemptible run got {note.get('signal', 'a stop signal')}: stop without a relaunch"
            except (OSError, ValueError):
                detail = f"stop request {path} (unreadable): stop without a relaunch"
            return StopVerdict(StopCauseName.CANCELLED, Action.END, detail)
    return StopVerdict(StopCauseName.REQUESTED, Action.REQUEUE, "a stop signal, no scheduler to ask: relaunch")


def decide(env: JobEnvironment, stop_reason: str, timeout: float = QUERY_TIMEOUT,
           signal_at: Optional[float] = None) -> StopVerdict:
    """The verdict for a stop whose agreed reason is ``stop_reason`` (call on global rank 0, at the boundary).

    ``signal_at``: when the first stop signal arrived (``time.time()``); the controller's state settles
    10-40 ms after it signalled (measured), so the question waits until 0.1 s after it at most.
    """
    if signal_at is not None:
        time.sleep(max(0.0, min(0.1, signal_at + 0.1 - time.time())))
    try:
        verdict = _decide(env, stop_reason, timeout)
    except Exception as exc:  # noqa: BLE001 - the other ranks wait for this answer: never leave them hanging
        verdict = StopVerdict(StopCauseName.UNKNOWN, Action.REQUEUE, f"asking for the stop's cause failed: {exc!r}")
    if verdict.cause == StopCauseName.UNKNOWN:
        log.warning("preemptible: %s", verdict.detail)
    return verdict


def _decide(env: JobEnvironment, stop_reason: str, timeout: float) -> StopVerdict:
    if stop_reason == "deadline":
        # preemptible's own deadline (the job's end is near): nothing was sent, nothing to ask.
        return StopVerdict(StopCauseName.TIME_LIMIT, Action.REQUEUE, "the job's deadline is too close for another save")
    if env.under_slurm and env.slurm_job_id:
        try:
            answer = query_slurm(env.slurm_job_id, timeout=timeout)
        except RuntimeError as exc:
            return classify_slurm(None, env.slurm_restart_count, env.signal_lead, error=str(exc))
        return classify_slurm(answer, env.slurm_restart_count, env.signal_lead)
    if stop_reason == "SIGINT":
        # Only when SIGINT is one of the session's signals (not by default): a terminal's Ctrl-C means stop.
        return StopVerdict(StopCauseName.CANCELLED, Action.END, "SIGINT (Ctrl-C) without a scheduler: stop")
    return classify_local(env.stop_request)
