"""Validating the checkpoint to resume from once per run, not once per rank.

Why: validation reads the whole file (size + checksum). When every rank did it, a node of 8 ranks
read an 8 GB checkpoint 8 extra times from the shared filesystem before loading it, and resume
time grew with the world size (``benchmarks/RESULTS.md``, growth).

How: :meth:`~preemptible.core.session.PreemptionSession.resume_path` is called before the process
group exists (the canonical script calls it before ``trainer.fit``), so there is no collective to
share a verdict with. Global rank 0 validates (and quarantines what fails) and writes its answer to
``<run_dir>/resume-verdict.json``: the attempt it belongs to (job id and restart count), the file
chosen, its commit record, and the files it rejected. Every other rank waits (bounded) for a verdict
that fits what it sees: the same attempt, the chosen file's commit record unchanged, its size as
recorded (a cheap check), and no committed checkpoint newer than it that rank 0 did not reject. Then
it takes rank 0's answer. A rank that waited in vain validates by itself, as before, and says so.

The run directory is shared by all nodes (checked at start, :mod:`preemptible.core.shared`), so
one validation serves every node. The ranks compare their answers once the group exists
(:func:`check_same_resume`): a disagreement is an error with both answers, never a silent divergence.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from preemptible.core.agreement import StopAgreement
from preemptible.core.environment import JobEnvironment
from preemptible.core.fsutil import atomic_write_json, read_json
from preemptible.core.store import CheckpointStore, StoredCheckpoint

log = logging.getLogger(__name__)

VERDICT_FILE = "resume-verdict.json"

#: Seconds a rank waits for rank 0's verdict before validating by itself (rank 0 reads ~1 GB/s).
DEFAULT_VERDICT_WAIT = 600.0


def _attempt(env: JobEnvironment) -> list[Any]:
    return [env.job_id, env.restart_count]


def validate_as_rank_zero(store: CheckpointStore, run_path: Path, env: JobEnvironment,
                          checksum: bool) -> Optional[StoredCheckpoint]:
    """Global rank 0: validate newest first (quarantining what fails), write the verdict for the others."""
    candidates = [c.path.name for c in store.committed()]
    if not candidates:
        return None  # a fresh run: the others see no checkpoint either and do not wait
    found = store.latest_valid(checksum=checksum, quarantine=True)
    remaining = {c.path.name for c in store.committed()}
    rejected = [name for name in candidates if name not in remaining]
    verdict = {"attempt": _attempt(env), "time": time.time(), "answer": found.path.name if found else None,
               "record": asdict(found.record) if found else None, "rejected": rejected}
    atomic_write_json(run_path / VERDICT_FILE, verdict)
    return found


def _fits(verdict: Any, store: CheckpointStore, env: JobEnvironment) -> tuple[bool, Optional[StoredCheckpoint]]:
    """Whether ``verdict`` answers for what this rank sees now, and the answer."""
    if not isinstance(verdict, dict) or verdict.get("attempt") != _attempt(env):
        return False, None
    committed = store.committed()
    rejected = set(verdict.get("rejected") or [])
    answer = verdict.get("answer")
    newer = [c for c in committed if c.path.name not in rejected]
    if answer is None:
        return not newer, None
    chosen = next((c for c in committed if c.path.name == answer), None)
    if chosen is None or asdict(chosen.record) != verdict.get("record"):
        return False, None
    if any(c.path.name != answer and (c.record.step, c.record.time) > (chosen.record.step, chosen.record.time) for c in newer):
        return False, None  # a newer checkpoint rank 0 has not judged: a verdict of an earlier attempt
    try:
        store.validate(chosen, checksum=False)  # the size: cheap, catches a file replaced since
    except Exception:  # noqa: BLE001 - not this verdict then; rank 0's next one (or our own check) decides
        return False, None
    return True, chosen


def wait_for_rank_zero(store: CheckpointStore, run_path: Path, env: JobEnvironment, checksum: bool,
                       wait: float = DEFAULT_VERDICT_WAIT) -> Optional[StoredCheckpoint]:
    """Any other rank: rank 0's answer once a fitting verdict is there; after ``wait`` seconds, our own validation."""
    if not store.committed():
        return None  # nothing committed: rank 0 can only reject checkpoints, never add one
    deadline = time.monotonic() + wait
    pause = 0.01
    while True:
        try:
            verdict = read_json(run_path / VERDICT_FILE)
        except (OSError, ValueError):
            verdict = None
        ok, answer = _fits(verdict, store, env)
        if ok:
            return answer
        if time.monotonic() >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.25)
    log.warning("preemptible: no verdict from global rank 0 on the checkpoint to resume within %.0f s; "
                "validating it on this rank too", wait)
    return store.latest_valid(checksum=checksum, quarantine=False)


def check_same_resume(agreement: StopAgreement, resumed_from: Optional[Path]) -> None:
    """Every rank, once the group exists: raise unless all ranks resume from the same checkpoint (or none)."""
    answers = agreement.gather(resumed_from.name if resumed_from else None)
    if len(set(answers)) > 1:
        listed = ", ".join(f"rank {r}: {a or 'fresh start'}" for r, a in enumerate(answers))
        raise RuntimeError(f"preemptible: the ranks found different checkpoints to resume from ({listed}). A checkpoint "
                           "was committed or changed while the ranks started; start the job again.")
