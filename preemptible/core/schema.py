"""Every record preemptible writes, defined once: journal events, ``run.json``, commit records, step traces.

Writers and readers (the session, the Lightning layer, ``status``/``report``, the simulator, ``check``,
the demo, the benchmarks and the tests) all use these names, so a field renamed here is renamed
everywhere, and :meth:`preemptible.core.journal.Journal.append` refuses an event or field that is
not listed below instead of letting a typo reach the run directory.

Nothing here imports torch or Lightning: the operator tools read run directories without them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

# ------------------------------------------------------------------------------------------------
# Journal events (``events.jsonl``, one JSON object per line)
# ------------------------------------------------------------------------------------------------


class Event:
    """Event names. Each event carries :data:`COMMON_FIELDS` plus its own :data:`EVENT_FIELDS`."""

    START = "start"  #: rank 0, at trainer set-up of a fresh run
    RESUME = "resume"  #: rank 0, at trainer set-up of a run that continues from a checkpoint
    TRAIN_START = "train_start"  #: rank 0, right before the first step of an attempt
    PROGRESS = "progress"  #: rank 0, a sparse (time, step) series for timelines
    SIGNAL = "signal"  #: every rank that received a preemption signal (once per attempt)
    DEADLINE = "deadline"  #: rank 0, the job's end is too close for another save
    STOP_AGREED = "stop_agreed"  #: rank 0, all ranks agreed to stop at this step
    STOP_CANCELLED = "stop_cancelled"  #: rank 0, training ended right after the emergency checkpoint
    STOP_CAUSE = "stop_cause"  #: rank 0, why the run stopped and whether it comes back (asked once, at the stop)
    CHECKPOINT = "checkpoint"  #: rank 0, a checkpoint was committed
    CHECKPOINT_SKIPPED = "checkpoint_skipped"  #: rank 0, an agreed periodic save was skipped
    CHECKPOINT_FAILED = "checkpoint_failed"  #: rank 0, a background checkpoint write failed
    REQUEUE = "requeue"  #: rank 0, what the requeue backend did
    EXIT = "exit"  #: every rank, leaving with an exit code after a stop
    FINISH = "finish"  #: rank 0, training reached its end
    FAILURE = "failure"  #: any rank whose training raised an exception (kind: see :class:`FailureKind`)
    CRASH = "crash"  #: the supervisor (batch shell, ``preemptible run``, submitit task): what it decided after
    #: an attempt that ended with neither 0 nor the requeue code (rank :data:`SUPERVISOR_RANK`)
    PEER_LOST = "peer_lost"  #: every rank that leaves because another rank died or froze (core/watchdog.py)
    FAULT_INJECTED = "fault_injected"  #: a rank about to do a testing fault to itself (core/inject.py)
    VALIDATION_OWED = "validation_owed"  #: rank 0, a stop inside validation saved the state from its start
    VALIDATION_REDONE = "validation_redone"  #: rank 0, a resumed run begins the validation its predecessor owed


#: Fields every event has, written by the journal itself.
COMMON_FIELDS = ("event", "time", "job_id", "restart_count", "host", "rank", "pid")

#: The fields of each event, beyond :data:`COMMON_FIELDS`.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    Event.START: ("checkpoint", "world_size", "attempt", "backend", "process_started"),
    Event.RESUME: ("checkpoint", "world_size", "attempt", "backend", "process_started"),
    Event.TRAIN_START: ("step", "epoch"),
    Event.PROGRESS: ("step", "epoch"),
    Event.SIGNAL: ("signal", "count", "received_at", "step", "place", "batch"),
    Event.DEADLINE: ("step", "seconds_left", "needed"),
    Event.STOP_AGREED: ("step", "reason", "place", "batch"),
    Event.STOP_CANCELLED: ("step", "reason"),
    Event.STOP_CAUSE: ("step", "cause", "action", "detail"),
    Event.CHECKPOINT: ("path", "step", "bytes", "seconds", "reason", "background", "signal_to_commit_seconds",
                       "copy_seconds"),
    Event.CHECKPOINT_SKIPPED: ("step", "reason"),
    Event.CHECKPOINT_FAILED: ("step", "reason", "error"),
    Event.REQUEUE: ("backend", "outcome", "detail", "error", "step"),
    Event.EXIT: ("code", "reason", "step"),
    Event.FINISH: ("step",),
    Event.FAILURE: ("step", "kind", "error"),
    Event.CRASH: ("exit_code", "step", "checkpoint_step", "decision", "detail"),
    Event.PEER_LOST: ("lost_rank", "how", "seconds_silent", "code", "step"),
    Event.FAULT_INJECTED: ("action", "step"),
    Event.VALIDATION_OWED: ("step", "batch", "path"),
    Event.VALIDATION_REDONE: ("step",),
}

#: The ``rank`` of events written by a supervisor (the batch shell's decision, ``preemptible run``), not a rank.
SUPERVISOR_RANK = -1


class FailureKind:
    """Values of the ``kind`` field of :attr:`Event.FAILURE`."""

    USER = "user"  #: an exception of the training code itself (deterministic: retrying repeats it)
    PEER = "peer"  #: a collective failed because another rank died or vanished (a crash elsewhere)


class CrashDecision:
    """Values of the ``decision`` field of :attr:`Event.CRASH`."""

    REQUEUE = "requeue"  #: a crash: start again from the newest checkpoint
    FAILED = "failed"  #: a failure of the training code (or before the session started): final
    CRASH_LOOP = "crash_loop"  #: a second crash in a row without a new checkpoint: final
    CRASH_LIMIT = "crash_limit"  #: ``max_crash_requeues`` used up: final
    CANCELLED = "cancelled"  #: the job is being cancelled (``scancel``): never requeued
    SHELL_REQUEUE = "shell_requeue"  #: exit 144 and the ranks could not requeue: the batch shell does it
    #: the session left on purpose with another code (requeue limit, a failed requeue request, a
    #: cancellation: its ``exit`` event says which): final, never mistaken for a crash
    LEFT_ON_PURPOSE = "left_on_purpose"


class Place:
    """Values of the ``place`` field of :attr:`Event.SIGNAL` and :attr:`Event.STOP_AGREED`: where in the loop
    the signal was first looked at, or the stop was taken (``batch`` then counts batches of that place:
    the optimizer step for training, the batch index inside a validation or the sanity check)."""

    BEFORE_TRAINING = "before_training"  #: set-up, checkpoint loading, before the first step
    SANITY_CHECK = "sanity_check"
    TRAINING = "training"  #: an optimizer-step boundary
    VALIDATION = "validation"  #: a validation batch boundary inside training (the state saved: its start)
    VALIDATION_END = "validation_end"  #: after the last validation batch (``on_validation_epoch_end`` work)
    EPOCH_START = "epoch_start"  #: between an epoch's end hooks and the next epoch's data


#: Places where nothing new has been trained in the attempt: a stop there saves nothing.
PLACES_BEFORE_TRAINING = (Place.BEFORE_TRAINING, Place.SANITY_CHECK)

#: Events that open an attempt.
ATTEMPT_OPENERS = (Event.START, Event.RESUME)


class RequeueOutcomeName:
    """Values of the ``outcome`` field of :attr:`Event.REQUEUE`."""

    REQUESTED = "requested"
    NONE = "none"
    FAILED = "failed"
    LIMIT_REACHED = "limit_reached"
    #: the ranks cannot requeue (no ``scontrol`` in the container) and the batch shell will, after the step
    DELEGATED = "delegated"


class StopCauseName:
    """Values of the ``cause`` field of :attr:`Event.STOP_CAUSE` (see :mod:`preemptible.core.cause`)."""

    CANCELLED = "cancelled"  #: ``scancel``, submitit's ``job.cancel()``, Ctrl-C/SIGTERM to ``preemptible run``: ends the run
    PREEMPTED = "preempted"  #: a higher-priority job needs the resources: requeue
    TIME_LIMIT = "time_limit"  #: the job's time limit (``--signal`` warning, or the limit itself): requeue
    REQUEUED_BY_OPERATOR = "requeued_by_operator"  #: ``scontrol requeue``: SLURM brings the job back itself
    REQUESTED = "requested"  #: a stop signal nobody explained (``scancel --signal=USR1``, a local signal): requeue
    UNKNOWN = "unknown"  #: the scheduler did not answer: requeue, the safe side


def check_event(event: str, fields: dict[str, Any]) -> None:
    """Raise ``ValueError`` for an event name or field that is not part of the schema."""
    known = EVENT_FIELDS.get(event)
    if known is None:
        raise ValueError(f"unknown journal event {event!r}: add it to preemptible.core.schema.EVENT_FIELDS")
    unknown = [name for name in fields if name not in known]
    if unknown:
        raise ValueError(f"journal event {event!r} has no field(s) {unknown}: known are {list(known)} "
                         "(preemptible.core.schema.EVENT_FIELDS)")


def read_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield a journal's events in order, skipping a torn or garbled line (the one events reader)."""
    p = Path(path)
    if p.is_dir():
        p = p / JOURNAL_FILE
    if not p.exists():
        return
    with open(p, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


# ------------------------------------------------------------------------------------------------
# The run directory's files and ``run.json``
# ------------------------------------------------------------------------------------------------

JOURNAL_FILE = "events.jsonl"
RECORD_FILE = "run.json"
PROGRESS_FILE = "progress.json"
LOCK_FILE = "lock.json"
CHECKPOINT_DIR = "checkpoints"


class RunRecordKey:
    """Keys of ``run.json`` (written by global rank 0 only)."""

    CREATED = "created"  #: unix time of the first write
    ATTEMPTS = "attempts"  #: trainer set-ups so far
    REQUEUES = "requeues"  #: requeues requested so far (the budget ``max_requeues`` counts)
    STATUS = "status"  #: one of :class:`RunStatus`
    WORLD_SIZE = "world_size"
    LAST_PREEMPTED_STEP = "last_preempted_step"
    FINISHED_STEP = "finished_step"
    LAST_STOP_CAUSE = "last_stop_cause"  #: the :class:`StopCauseName` of the latest stop
    LOGGERS = "loggers"  #: ``"<index>:<LoggerClass>"`` → version (TensorBoard/CSV) or run id (W&B)
    CRASH_REQUEUES = "crash_requeues"  #: requeues after a crash so far (counted apart from ``requeues``)
    CRASHES_WITHOUT_PROGRESS = "crashes_without_progress"  #: crashes in a row with no new checkpoint between them
    MAX_CRASH_REQUEUES = "max_crash_requeues"  #: the run's crash-requeue limit, for the supervisor to read
    LAST_FAILURE = "last_failure"  #: the message of the final failure (crash loop, limit, user code)


class RunStatus:
    """Values of ``run.json``'s ``status``, as written by the session."""

    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    REQUEUE_LIMIT = "requeue_limit"
    REQUEUE_FAILED = "requeue_failed"
    CANCELLED = "cancelled"  #: stopped on purpose (``scancel``, Ctrl-C): checkpoint kept, not requeued
    FAILED = "failed"  #: the training code raised: final, not retried
    CRASHED = "crashed"  #: the last attempt crashed and was requeued
    CRASH_LOOP = "crash_loop"  #: crashed twice in a row without progress: stopped
    CRASH_LIMIT = "crash_limit"  #: ``max_crash_requeues`` used up: stopped


# ------------------------------------------------------------------------------------------------
# Commit records (``<checkpoint>.commit.json``)
# ------------------------------------------------------------------------------------------------

COMMIT_SUFFIX = ".commit.json"
RECORD_FORMAT = 1


@dataclass
class CommitRecord:
    """What is known about a committed checkpoint; stored as JSON next to it.

    A checkpoint exists only once this record does (see :mod:`preemptible.core.store`).
    ``extra`` holds the save's own timings: ``signal_at``, ``save_started_at``, ``background``,
    ``copy_seconds``.
    """

    file: str
    step: int
    bytes: int
    checksum: str  # "<algorithm>:<hex digest>" of the whole file, e.g. "crc32:1c291ca3"
    epoch: int = 0
    reason: str = ""
    world_size: int = 1
    time: float = 0.0
    save_seconds: float = 0.0
    job_id: Optional[str] = None
    restart_count: int = 0
    host: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = RECORD_FORMAT


class CommitRecordKey:
    """Keys of a commit record's JSON (fields of :class:`CommitRecord`) that readers outside the store use."""

    WORLD_SIZE = "world_size"


#: Reasons a checkpoint is written for that are not a stop (a stop's reason is its signal or "deadline").
REASON_PERIODIC = "periodic"
REASON_FINISHED = "finished"

#: Where the adapters keep preemptible's own state inside a checkpoint (Lightning: ``callbacks[...]``; a plain
#: loop's ``DictSnapshot``: the top level). The name is the callback's, kept so that existing checkpoints load.
STATE_KEY = "PreemptionCallback"
#: Version of that state's layout: ``{"format", "ranks": [per-rank state], "gathered"}``.
STATE_FORMAT = 1

# ------------------------------------------------------------------------------------------------
# Step traces (``tools.tracing.StepRecorder``; read by ``check``, the demo, benchmarks and tests)
# ------------------------------------------------------------------------------------------------


class TraceKind:
    TRAIN = "train"  #: one training batch: loss (float.hex), optionally a weights digest
    VAL = "val"  #: one validation batch outside the sanity check: loss
    FINAL = "final"  #: at the end of fit, per rank: the digest of the final weights
    VAL_METRICS = "val_metrics"  #: at the end of a validation outside the sanity check: the logged metrics


#: Kinds a resumed run records again when it redoes a validation that was interrupted (never a replay of training).
REDONE_KINDS = (TraceKind.VAL, TraceKind.VAL_METRICS)


#: The fields of every trace line (``loss``/``weights`` depend on the kind).
TRACE_FIELDS = ("kind", "rank", "epoch", "batch", "step", "attempt", "loss", "weights", "metrics")

TraceKey = tuple[str, int, int, Optional[int], int]


@dataclass
class Trace:
    """A step trace read back: per-batch entries by ``(kind, rank, epoch, batch, step)``.

    Attributes:
        entries: the last entry for each batch key.
        duplicates: keys seen more than once (a batch trained again after a resume); a validation batch
            recorded again because an interrupted validation was redone is in ``redone`` instead.
        redone: validation keys (:data:`REDONE_KINDS`) recorded more than once.
        final: rank → digest of its final weights.
        lines: every per-batch entry in file order, replays included (``final`` entries excepted).
    """

    entries: dict[TraceKey, dict[str, Any]] = field(default_factory=dict)
    duplicates: list[TraceKey] = field(default_factory=list)
    redone: list[TraceKey] = field(default_factory=list)
    final: dict[int, str] = field(default_factory=dict)
    lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def losses(self) -> dict[TraceKey, Any]:
        return {key: entry.get("loss") for key, entry in self.entries.items()}


def trace_entry(kind: str, rank: int, epoch: int, batch: Optional[int], step: int, attempt: int,
                **fields: Any) -> dict[str, Any]:
    """One trace line (the one trace writer's format); ``ValueError`` for a field not in :data:`TRACE_FIELDS`."""
    entry = {"kind": kind, "rank": rank, "epoch": epoch, "batch": batch, "step": step, "attempt": attempt, **fields}
    unknown = [name for name in entry if name not in TRACE_FIELDS]
    if unknown:
        raise ValueError(f"trace entries have no field(s) {unknown}: known are {list(TRACE_FIELDS)} "
                         "(preemptible.core.schema.TRACE_FIELDS)")
    return entry


def trace_key(entry: dict[str, Any]) -> TraceKey:
    return (entry["kind"], entry["rank"], entry["epoch"], entry["batch"], entry["step"])


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a step trace (the one trace reader). A missing file is an empty trace."""
    trace = Trace()
    p = Path(path)
    if not p.exists():
        return trace
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry["kind"] == TraceKind.FINAL:
            trace.final[entry["rank"]] = entry["weights"]
            continue
        trace.lines.append(entry)
        key = trace_key(entry)
        if key in trace.entries:
            (trace.redone if entry["kind"] in REDONE_KINDS else trace.duplicates).append(key)
        trace.entries[key] = entry
    return trace
