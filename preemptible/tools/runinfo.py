"""What happened to a run: state, checkpoints, attempts, interruptions and goodput, from its run directory.

Pure functions over ``events.jsonl``, ``run.json``, ``progress.json`` and the checkpoint store, shared by
``preemptible status`` and ``preemptible report``; no Lightning, no rich. Nothing is written or moved, so
it is safe on a directory whose job is running (a damaged checkpoint is reported, never quarantined).

Why one module of ~540 lines: the definitions below are the contract of ``status`` and ``report``, and
the functions of this module implement them one by one; kept in one file, a reader checks each function
against the definition it claims, where a split would put the two in different files.

Definitions (times are the journal's wall-clock ``time`` fields, in seconds):

* **Attempt**: one process lifetime of the job, opened by rank 0's ``start``/``resume`` event (trainer
  set-up). It *starts* when rank 0's process started (the event's ``process_started``, the operating
  system's start time of the process; the event's own time for journals that lack it) and *ends* at
  its last journal event from any rank (``now`` while it runs).
* **Startup / restart** of an attempt: its process start → ``train_start`` event (the interpreter,
  imports, the process group, restoring the checkpoint, building loaders, sanity check). Called
  *startup* for the first attempt, *restart* after.
* **Queue wait**: an attempt's end → the next attempt's process start: the scheduler's queue and the
  launch of the process, which no process of the job is there to journal.
* **Training time** of an attempt: ``train_start`` → the agreed stop (``stop_agreed``), else ``finish``,
  else the attempt's last event (a crash) or ``now`` (running), minus checkpoint saves in that interval.
* **Save time**: the ``seconds`` of each ``checkpoint`` event (rank 0's save start → commit). A save
  written on a background thread (``background: true``) overlaps training and counts as training time.
* **Steps lost** by an attempt: the steps it trained beyond the step that training was later resumed
  from, ``end_step - min(end_step, min(resumed step of every later attempt))``, clamped at 0. For the
  last attempt, when it was interrupted, the step a restart would resume from is the newest valid
  checkpoint. It is 0 when the stop step was checkpointed and resumed from. When an attempt died
  without a journal record, its last step is its last ``progress`` event (a lower bound: they are sparse).
* **Redone time**: the training time an attempt spent on its lost steps (the time at a step is
  interpolated linearly between the journal's (time, step) points).
* **Useful training time**: training time minus redone time — time whose steps the run kept.
* **Wall time**: first attempt's ``start`` event → last attempt's end (``now`` while it runs).
* **Goodput**: useful training time / wall time. The breakdown
  ``useful + redone + save + startup + restart + queue + other = wall`` holds exactly; *other* is the
  remainder (agreeing on a stop, requesting the requeue, exiting) and is clamped at 0.
* **Time lost** by an interruption: its attempt's redone time + the time from its stop to its end
  (save, requeue request, exit) + the queue wait and restart of the next attempt.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from preemptible.core.exit import CANCELLED_EXIT_CODE, REQUEUE_EXIT_CODE
from preemptible.core.rundir import RunDirectory, read_progress
from preemptible.core.schema import (
    ATTEMPT_OPENERS,
    CHECKPOINT_DIR,
    COMMIT_SUFFIX,
    JOURNAL_FILE,
    CrashDecision,
    Event,
    RequeueOutcomeName,
    RunRecordKey,
    RunStatus,
    StopCauseName,
    read_events,
)
from preemptible.core.store import InvalidCheckpoint, StoredCheckpoint

#: A running attempt on another host counts as running while it wrote something this recently (seconds).
DEFAULT_STALE_AFTER = 300.0

# Rank-0 events whose ``step`` is the step training had reached at that moment.
_STEP_EVENTS = (Event.TRAIN_START, Event.PROGRESS, Event.SIGNAL, Event.DEADLINE, Event.STOP_AGREED, Event.FINISH)


class RunInfoError(RuntimeError):
    """The directory cannot be summarised (missing, or not a run directory); the message says what to pass."""


@dataclass
class CheckpointInfo:
    """A committed checkpoint. ``valid`` is the size check, plus the checksum when asked (``checksum``)."""

    path: str
    step: int
    bytes: int
    time: Optional[float]
    age_seconds: Optional[float]
    reason: str
    valid: bool
    checksum: bool
    problem: Optional[str] = None


@dataclass
class AttemptInfo:
    """One attempt (see the module docstring for each duration's definition)."""

    index: int
    job_id: Optional[str]
    restart_count: int
    host: str
    pid: Optional[int]
    world_size: Optional[int]
    started_at: float
    ended_at: float
    #: finished | preempted | cancelled | requeue_limit | requeue_failed | failed (other exit code) | crashed | running
    #: | unknown
    outcome: str
    train_started_at: Optional[float] = None
    train_ended_at: Optional[float] = None
    resumed_from_step: Optional[int] = None
    end_step: Optional[int] = None
    stop_step: Optional[int] = None
    #: why the ranks agreed to stop: the signal's name, ``"deadline"``, ...
    stop_reason: Optional[str] = None
    checkpoint_step: Optional[int] = None
    #: why the scheduler stopped it (a :class:`~preemptible.core.schema.StopCauseName`: cancelled, preempted,
    #: time_limit, requeued_by_operator, requested, unknown), as asked at the stop; ``None`` before that was journaled
    stop_cause: Optional[str] = None
    stop_cause_detail: Optional[str] = None
    exit_code: Optional[int] = None
    signal: Optional[str] = None
    signal_at: Optional[float] = None
    requeue: Optional[str] = None
    requeue_detail: Optional[str] = None
    startup_seconds: float = 0.0
    training_seconds: float = 0.0
    useful_seconds: float = 0.0
    redone_seconds: float = 0.0
    save_seconds: float = 0.0
    steps_lost: int = 0
    #: what the supervisor decided after a crash or failure (``CrashDecision``) and its message
    crash_decision: Optional[str] = None
    crash_detail: Optional[str] = None
    #: (time, step) points of training progress, in time order (for timelines).
    points: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class Interruption:
    """An attempt that ended without finishing, and what it cost."""

    attempt: int
    #: the attempt's outcome: preempted, cancelled, requeue_limit, requeue_failed, failed or crashed
    cause: str
    #: why it stopped: the signal's name, ``"deadline"``, ... (``None`` for a crash)
    reason: Optional[str]
    signal: Optional[str]
    stop_step: Optional[int]
    checkpoint_step: Optional[int]
    #: the step the next attempt resumed from; ``None`` while no next attempt has started training.
    resumed_from_step: Optional[int]
    steps_lost: int
    redone_seconds: float
    stopping_seconds: float
    queue_seconds: Optional[float]
    restart_seconds: Optional[float]
    time_lost_seconds: float
    #: the scheduler's cause of the stop (:attr:`AttemptInfo.stop_cause`)
    stop_cause: Optional[str] = None


@dataclass
class Goodput:
    """Wall time split into components that add up to it; ``goodput = useful_seconds / wall_seconds``."""

    wall_seconds: float
    useful_seconds: float
    redone_seconds: float
    save_seconds: float
    startup_seconds: float
    restart_seconds: float
    queue_seconds: float
    other_seconds: float
    goodput: Optional[float]

    def components(self) -> dict[str, float]:
        """The parts of :attr:`wall_seconds`, in display order."""
        return {"useful training": self.useful_seconds, "redone work": self.redone_seconds,
                "saving checkpoints": self.save_seconds, "first startup": self.startup_seconds,
                "restarting": self.restart_seconds, "waiting in the queue": self.queue_seconds,
                "other (stop, requeue, exit)": self.other_seconds}


@dataclass
class FailedSave:
    """A checkpoint write that failed (journaled by the writer as it happened; the earlier checkpoints are intact)."""

    step: Optional[int]
    time: float
    reason: str
    error: str


@dataclass
class RunInfo:
    """Everything ``preemptible status`` shows; :meth:`to_json` is the ``--json`` document."""

    run_dir: str
    generated_at: float
    state: str
    state_detail: str
    current_step: Optional[int]
    last_committed_step: Optional[int]
    checkpoints: list[CheckpointInfo]
    quarantined: int
    attempts: list[AttemptInfo]
    interruptions: list[Interruption]
    preemptions: int
    steps_lost: int
    time_lost_seconds: float
    goodput: Goodput
    requeues: Optional[int]
    record: dict[str, Any]
    progress: Optional[dict[str, Any]]
    events: int
    failed_saves: list[FailedSave] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["format"] = 1
        return _rounded(doc)


def summarize(
    run_dir: str | Path,
    *,
    checksum: bool = False,
    now: Optional[float] = None,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> RunInfo:
    """Summarise ``run_dir`` (see the module docstring for definitions).

    Args:
        checksum: also verify each checkpoint's checksum (reads every byte); default: size only.
        now: the current time (tests pass a fixed one).
        stale_after: seconds without a journal or progress update after which an attempt on another
            host (whose process cannot be checked from here) is reported as ``unknown``, not ``running``.

    Raises:
        RunInfoError: the directory does not exist or holds no run.
    """
    path = Path(run_dir)
    now = time.time() if now is None else now
    if not path.is_dir():
        raise RunInfoError(f"run directory {path} does not exist: pass the directory given to "
                           "PreemptionCallback(run_dir=...) or $PREEMPTIBLE_RUN_DIR (the same one for every restart)")
    run = RunDirectory(path)
    events = [e for e in read_events(path / JOURNAL_FILE) if _well_formed(e)]
    record = run.read_record()
    progress = read_progress(path)
    committed = run.store.committed()
    if not events and not record and not committed:
        raise RunInfoError(f"{path} holds no events.jsonl, run.json or committed checkpoint: it is not a preemptible "
                           "run directory, or its job has not reached trainer.fit yet")

    checkpoints = [info for info in (_checkpoint_info(run, c, checksum, now) for c in committed) if info is not None]
    valid_steps = [c.step for c in checkpoints if c.valid]
    last_committed = max(valid_steps) if valid_steps else None
    groups = _group_attempts(events)
    attempts = [_attempt(i, g, now, last=i == len(groups) - 1, progress=progress, stale_after=stale_after)
                for i, g in enumerate(groups)]
    _account_lost_work(attempts, last_committed)
    interruptions = _interruptions(attempts)
    state, detail = _state(attempts, record, last_committed, now)
    quarantine = path / CHECKPOINT_DIR / "quarantine"
    return RunInfo(
        run_dir=str(path),
        generated_at=now,
        state=state,
        state_detail=detail,
        current_step=next((a.end_step for a in reversed(attempts) if a.end_step is not None), last_committed),
        last_committed_step=last_committed,
        checkpoints=checkpoints,
        quarantined=sum(1 for p in quarantine.iterdir() if f"{COMMIT_SUFFIX}." not in p.name) if quarantine.is_dir() else 0,
        attempts=attempts,
        interruptions=interruptions,
        preemptions=sum(1 for i in interruptions if (i.reason is not None or i.stop_step is not None)
                        and i.cause != "cancelled"),
        steps_lost=sum(a.steps_lost for a in attempts),
        time_lost_seconds=sum(i.time_lost_seconds for i in interruptions),
        goodput=_goodput(attempts),
        requeues=_int(record.get(RunRecordKey.REQUEUES)),
        record=record,
        progress=progress,
        events=len(events),
        failed_saves=[FailedSave(step=_int(e.get("step")), time=float(e["time"]), reason=str(e.get("reason") or ""),
                                 error=str(e.get("error") or "")) for e in events if e["event"] == Event.CHECKPOINT_FAILED],
    )


def time_at_step(points: Sequence[tuple[float, int]], step: int) -> Optional[float]:
    """When ``step`` was reached, interpolated linearly between (time, step) points; ``None`` without points."""
    if not points:
        return None
    prev_t, prev_s = points[0]
    if step <= prev_s:
        return prev_t
    for t, s in points[1:]:
        if s >= step:
            return prev_t + (t - prev_t) * (step - prev_s) / (s - prev_s)
        prev_t, prev_s = t, s
    return points[-1][0]


# -- attempts ------------------------------------------------------------------------------------------
def _well_formed(e: dict[str, Any]) -> bool:
    # A hand-edited or future-format line must not take the whole summary down.
    return isinstance(e.get("event"), str) and isinstance(e.get("time"), (int, float))


def _group_attempts(events: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split the journal at rank 0's start/resume events (file order: appends are ordered per process)."""
    groups: list[list[dict[str, Any]]] = []
    for e in events:
        if (e["event"] in ATTEMPT_OPENERS and e.get("rank", 0) == 0) or not groups:
            # Events before any opener (a torn opener line) still form an attempt rather than vanish.
            groups.append([e])
        else:
            groups[-1].append(e)
    return groups


def _attempt(index: int, events: list[dict[str, Any]], now: float, last: bool = False,
             progress: Optional[dict[str, Any]] = None, stale_after: float = DEFAULT_STALE_AFTER) -> AttemptInfo:
    """Build one attempt from its events; ``last`` attempts without a final record are checked for liveness."""
    first = events[0]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        kinds.setdefault(e["event"], []).append(e)
    a = AttemptInfo(index=index, job_id=first.get("job_id"), restart_count=_int(first.get("restart_count")) or 0,
                    host=str(first.get("host", "")), pid=_int(first.get("pid")), world_size=_int(first.get("world_size")),
                    started_at=_process_start(first), ended_at=max(float(e["time"]) for e in events), outcome="crashed")
    a.points = [(float(e["time"]), int(e["step"])) for e in events
                if e.get("rank", 0) == 0 and e["event"] in _STEP_EVENTS and isinstance(e.get("step"), int)]
    _make_monotonic(a.points)
    if Event.TRAIN_START in kinds:
        ts = kinds[Event.TRAIN_START][0]
        a.train_started_at, a.resumed_from_step = float(ts["time"]), _int(ts.get("step"))
    if Event.SIGNAL in kinds:
        sig = min(kinds[Event.SIGNAL], key=lambda e: e.get("received_at") or e["time"])
        a.signal, a.signal_at = sig.get("signal"), sig.get("received_at") or sig["time"]
    if Event.STOP_AGREED in kinds:
        agreed = kinds[Event.STOP_AGREED][0]
        a.stop_step, a.stop_reason = _int(agreed.get("step")), agreed.get("reason")
    committed = [e for e in kinds.get(Event.CHECKPOINT, []) if isinstance(e.get("step"), int)]
    if committed:
        a.checkpoint_step = max(e["step"] for e in committed)
    # Only saves that held training up count as save time (see the module docstring).
    saves = [e for e in committed if not e.get("background")]
    a.save_seconds = sum(float(e.get("seconds") or 0.0) for e in saves)
    if kinds.get(Event.STOP_CAUSE):
        verdict = kinds[Event.STOP_CAUSE][-1]
        a.stop_cause, a.stop_cause_detail = verdict.get("cause"), verdict.get("detail")
    if kinds.get(Event.REQUEUE):
        req = kinds[Event.REQUEUE][-1]
        a.requeue, a.requeue_detail = req.get("outcome"), req.get("detail") or req.get("error")
    if kinds.get(Event.EXIT):
        # Rank 0's code is the job's; without it, the worst code of any rank.
        mine = [e for e in kinds[Event.EXIT] if e.get("rank", 0) == 0] or kinds[Event.EXIT]
        a.exit_code = max((c for c in (_int(e.get("code")) for e in mine) if c is not None), default=None)

    if kinds.get(Event.CRASH):
        crash = kinds[Event.CRASH][-1]
        a.crash_decision, a.crash_detail = crash.get("decision"), crash.get("detail")
        if a.exit_code is None:
            a.exit_code = _int(crash.get("exit_code"))
    if Event.FINISH in kinds:
        a.outcome = "finished"
    elif a.stop_cause == StopCauseName.CANCELLED and a.exit_code == CANCELLED_EXIT_CODE:
        a.outcome = "cancelled"
    elif a.crash_decision is not None and a.crash_decision not in (CrashDecision.SHELL_REQUEUE,
                                                                  CrashDecision.LEFT_ON_PURPOSE):
        a.outcome = "crashed" if a.crash_decision == CrashDecision.REQUEUE else "failed"
    elif a.requeue in (RequeueOutcomeName.LIMIT_REACHED, RequeueOutcomeName.FAILED):
        a.outcome = "requeue_limit" if a.requeue == RequeueOutcomeName.LIMIT_REACHED else "requeue_failed"
    elif a.exit_code is not None:
        a.outcome = {REQUEUE_EXIT_CODE: "preempted", 0: "finished"}.get(a.exit_code, "failed")
    elif last:
        _follow_unfinished(a, progress, now, stale_after)
    # else: a later attempt started, so this one ended without a record ("crashed").

    # The training interval ends at the agreed stop or the finish; otherwise at the attempt's end.
    stops = kinds.get(Event.STOP_AGREED) or kinds.get(Event.FINISH)
    stop = stops[0] if stops else None
    if a.train_started_at is None:
        a.startup_seconds = max(0.0, a.ended_at - a.started_at)
        return a
    a.startup_seconds = max(0.0, a.train_started_at - a.started_at)
    if stop is not None:
        a.train_ended_at, a.end_step = float(stop["time"]), _int(stop.get("step"))
    else:
        a.train_ended_at = a.ended_at
        a.end_step = a.points[-1][1] if a.points else None
    if a.end_step is None:
        a.end_step = a.resumed_from_step
    in_training = sum(float(e.get("seconds") or 0.0) for e in saves if float(e["time"]) <= a.train_ended_at)
    a.training_seconds = a.useful_seconds = max(0.0, a.train_ended_at - a.train_started_at - in_training)
    return a


def _process_start(opener: dict[str, Any]) -> float:
    """When the attempt's rank-0 process started: ``process_started`` if journaled and plausible, else the event's time."""
    at = float(opener["time"])
    started = opener.get("process_started")
    if isinstance(started, (int, float)) and 0 < at - started < 7 * 86400:  # not after set-up, not a week before
        return float(started)
    return at


def _make_monotonic(points: list[tuple[float, int]]) -> None:
    points.sort(key=lambda p: p[0])
    for i in range(1, len(points)):
        if points[i][1] < points[i - 1][1]:
            points[i] = (points[i][0], points[i - 1][1])  # steps never go back within an attempt


def _follow_unfinished(a: AttemptInfo, progress: Optional[dict[str, Any]], now: float, stale_after: float) -> None:
    """The last attempt has no final record: it is running, crashed, or (on a host we cannot check) unknown.

    ``progress.json`` of the same pid is newer than the sparse progress events: it extends the points.
    """
    if progress and _int(progress.get("pid")) == a.pid and isinstance(progress.get("time"), (int, float)):
        t, step = float(progress["time"]), _int(progress.get("step"))
        if step is not None and a.train_started_at is not None and t > (a.points[-1][0] if a.points else 0.0):
            a.points.append((t, max(step, a.points[-1][1] if a.points else step)))
        a.ended_at = max(a.ended_at, t)
    alive = _process_alive(a.pid, a.host, a.started_at)
    if alive is None:
        a.outcome = "running" if now - a.ended_at <= stale_after else "unknown"
    else:
        a.outcome = "running" if alive else "crashed"
    if a.outcome == "running":
        a.ended_at = now


def _process_alive(pid: Optional[int], host: str, started_at: float) -> Optional[bool]:
    """Whether the attempt's rank-0 process still runs; ``None`` when it is on another host."""
    if pid is None or host != socket.gethostname():
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        # A recycled pid belongs to a process created after the attempt's start event.
        return proc.create_time() <= started_at + 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _account_lost_work(attempts: list[AttemptInfo], last_committed: Optional[int]) -> None:
    """Steps lost and redone time per attempt: steps beyond the lowest step any later attempt resumed from."""
    resume_floor: Optional[int] = None
    for i in range(len(attempts) - 1, -1, -1):
        a = attempts[i]
        floor = resume_floor
        if i == len(attempts) - 1 and a.outcome not in ("running", "finished", "unknown"):
            floor = last_committed if last_committed is not None else 0  # where a restart would resume
        if a.end_step is not None and a.resumed_from_step is not None and floor is not None and floor < a.end_step:
            kept = max(floor, a.resumed_from_step)
            a.steps_lost = a.end_step - kept
            reached = time_at_step(a.points, kept)
            if reached is not None and a.train_ended_at is not None:
                a.redone_seconds = min(a.training_seconds, max(0.0, a.train_ended_at - reached))
                a.useful_seconds = a.training_seconds - a.redone_seconds
        if a.resumed_from_step is not None:
            resume_floor = (a.resumed_from_step if resume_floor is None
                            else min(resume_floor, a.resumed_from_step))


def _interruptions(attempts: list[AttemptInfo]) -> list[Interruption]:
    out = []
    for i, a in enumerate(attempts):
        if a.outcome in ("finished", "running", "unknown"):
            continue
        nxt = attempts[i + 1] if i + 1 < len(attempts) else None
        stopping = max(0.0, a.ended_at - a.train_ended_at) if a.train_ended_at is not None else 0.0
        queue = max(0.0, nxt.started_at - a.ended_at) if nxt else None
        restart = nxt.startup_seconds if nxt else None
        out.append(Interruption(
            attempt=a.index, cause=a.outcome, reason=a.stop_reason or a.signal, signal=a.signal, stop_step=a.stop_step,
            checkpoint_step=a.checkpoint_step, resumed_from_step=nxt.resumed_from_step if nxt else None,
            steps_lost=a.steps_lost, redone_seconds=a.redone_seconds,
            stopping_seconds=stopping, queue_seconds=queue, restart_seconds=restart,
            time_lost_seconds=a.redone_seconds + stopping + (queue or 0.0) + (restart or 0.0), stop_cause=a.stop_cause))
    return out


def _goodput(attempts: list[AttemptInfo]) -> Goodput:
    if not attempts:
        return Goodput(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)
    wall = max(0.0, attempts[-1].ended_at - attempts[0].started_at)
    parts = {
        "useful_seconds": sum(a.useful_seconds for a in attempts),
        "redone_seconds": sum(a.redone_seconds for a in attempts),
        "save_seconds": sum(a.save_seconds for a in attempts),
        "startup_seconds": attempts[0].startup_seconds,
        "restart_seconds": sum(a.startup_seconds for a in attempts[1:]),
        "queue_seconds": sum(max(0.0, b.started_at - a.ended_at) for a, b in zip(attempts, attempts[1:])),
    }
    other = max(0.0, wall - sum(parts.values()))
    return Goodput(wall_seconds=wall, other_seconds=other, goodput=parts["useful_seconds"] / wall if wall > 0 else None, **parts)


# -- state ---------------------------------------------------------------------------------------------
def _state(attempts: list[AttemptInfo], record: dict[str, Any], last_committed: Optional[int], now: float) -> tuple[str, str]:
    resume = (f"a restart resumes from step {last_committed}" if last_committed is not None
              else "no valid checkpoint: a restart starts from scratch")
    if not attempts:
        status = str(record.get(RunRecordKey.STATUS, ""))
        state = {RunStatus.FINISHED: "finished", RunStatus.PREEMPTED: "preempted", RunStatus.CANCELLED: "cancelled",
                 RunStatus.REQUEUE_LIMIT: "failed",
                 RunStatus.REQUEUE_FAILED: "failed"}.get(status, "unknown")
        return state, f"no journal (events.jsonl); run.json says {status or 'nothing'}"
    a = attempts[-1]
    where = f"attempt {a.index} on {a.host or '?'} (pid {a.pid})"
    if a.outcome == "running":
        step = f"at step {a.end_step}" if a.end_step is not None else "starting up"
        return "running", f"{where} is running, {step}"
    if a.outcome == "finished":
        return "finished", f"finished at step {a.end_step}"
    if a.outcome == "preempted":
        waiting = f"{_duration(now - a.ended_at)} ago"
        why = a.stop_reason or a.signal or "signal"
        if a.requeue in (RequeueOutcomeName.REQUESTED, RequeueOutcomeName.DELEGATED, None):
            return "preempted", f"stopped at step {a.stop_step} ({why}) {waiting}, requeue requested; {resume}"
        return "preempted", (f"stopped at step {a.stop_step} ({why}) {waiting}, but nothing requeued it "
                             f"({a.requeue_detail or a.requeue}): start the same command again; {resume}")
    if a.outcome == "cancelled":
        return "cancelled", (f"cancelled at step {a.stop_step} ({a.stop_cause_detail or a.signal}), not requeued; "
                             f"run the same command (or resubmit the job) to continue: {resume}")
    if a.outcome == "requeue_limit":
        return "failed", f"requeue limit reached at step {a.stop_step}: resubmit by hand or raise max_requeues; {resume}"
    if a.outcome == "requeue_failed":
        return "failed", f"requeue request failed ({a.requeue_detail}): resubmit by hand; {resume}"
    if a.crash_detail and a.outcome == "failed":
        return "failed", f"{a.crash_detail}; {resume}"
    if a.crash_detail and a.outcome == "crashed":
        return "crashed", f"{where} crashed and was requeued: {a.crash_detail}"
    if a.outcome == "failed":
        return "failed", f"{where} exited with code {a.exit_code}; see the job's log; {resume}"
    if a.outcome == "unknown":
        return "unknown", (f"{where} wrote nothing for {_duration(now - a.ended_at)} and its host cannot be checked from "
                           f"{socket.gethostname()}: check the job in the scheduler (squeue, sacct); {resume}")
    return "failed", (f"{where} ended without an exit record (killed: SIGKILL, out of memory, time limit; or crashed); "
                      f"see the job's log; {resume}")


def _checkpoint_info(run: RunDirectory, ckpt: StoredCheckpoint, checksum: bool, now: float) -> Optional[CheckpointInfo]:
    """``None`` for a checkpoint pruned by the running job between listing and checking it."""
    problem = None
    try:
        run.store.validate(ckpt, checksum=checksum)
    except InvalidCheckpoint as exc:
        if not ckpt.record_path.exists():
            return None  # retention removes the record first: it was pruned, not damaged
        problem = str(exc)
    rec = ckpt.record
    when = float(rec.time) if rec.time else None
    return CheckpointInfo(path=str(ckpt.path), step=rec.step, bytes=rec.bytes, time=when,
                          age_seconds=now - when if when is not None else None, reason=rec.reason,
                          valid=problem is None, checksum=checksum, problem=problem)


# -- small helpers -------------------------------------------------------------------------------------
def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``: how people read elapsed times."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_duration(seconds: Optional[float]) -> str:
    """A duration for tables; ``-`` for ``None``."""
    return "-" if seconds is None else _duration(seconds)


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj
