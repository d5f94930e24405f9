"""The oracle: what a run directory's checkpoints and losses *should* be, recomputed independently of the store.

Payloads are deterministic, so the oracle knows every byte a complete checkpoint of a step must
hold (:func:`expected_sha`); :func:`inventory` recomputes sizes and checksums from the files on disk
against their commit records instead of asking the store (which is what is under test); and
:func:`compare_to_reference` checks a preempted run's losses and final weights bitwise against an
uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Sequence

from preemptible.core.schema import COMMIT_SUFFIX, CommitRecord, TraceKey, read_trace
from preemptible.core.store import CheckpointStore, StoredCheckpoint, file_checksum
from preemptible.tools.faults.harness import MiB

CKPT_NAME = re.compile(r"^step-(\d{9})(?:\.(\d+))?\.ckpt$")

# =====================================================================================================
# Deterministic payloads
# =====================================================================================================
_BASE: bytes | None = None
_SHA_CACHE: dict[tuple[int, int], str] = {}


def _base() -> bytes:
    global _BASE
    if _BASE is None:
        _BASE = random.Random(20240607).randbytes(MiB)
    return _BASE


def payload_chunks(step: int, size: int) -> Iterator[bytes]:
    """The bytes of a checkpoint for ``step``: 1 MiB chunks, each stamped with (step, chunk index)."""
    base, done, i = _base(), 0, 0
    while done < size:
        head = f"step={step};chunk={i};".encode().ljust(32, b".")
        chunk = (head + base[32:])[: size - done]
        yield chunk
        done += len(chunk)
        i += 1


def expected_sha(step: int, size: int) -> str:
    key = (step, size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        for c in payload_chunks(step, size):
            h.update(c)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def commit_payload(store: CheckpointStore, step: int, size: int) -> StoredCheckpoint:
    """Commit the deterministic checkpoint of ``step`` (``size`` bytes) through the store, as a trainer would."""
    def write(f: IO[bytes]) -> None:
        for chunk in payload_chunks(step, size):
            f.write(chunk)

    pending = store.begin(step)
    store.write(pending, write)
    return store.commit(pending, CommitRecord(file="", step=step, bytes=0, checksum="", reason="fault-campaign"))


def sha256_of(path: Path) -> str:
    """The content's identity (independent of the store's own checksum, which is under test)."""
    return file_checksum(path, "sha256").partition(":")[2]


def recorded_checksum_holds(path: Path, recorded: str) -> bool:
    algorithm = recorded.partition(":")[0]
    try:
        return file_checksum(path, algorithm) == recorded
    except ValueError:  # an unknown algorithm: the record does not describe this file
        return False


# =====================================================================================================
# Independent checks of a run directory's checkpoints
# =====================================================================================================
@dataclasses.dataclass
class Inventory:
    records: dict[str, Optional[dict[str, Any]]]  # checkpoint file name -> parsed record (None if unreadable)
    intact: dict[str, int]  # committed checkpoint name -> step, for those whose bytes match their record
    broken: list[str]  # committed (record present) but not intact
    temps: list[str]
    orphans: list[str]  # data files without a record

    @property
    def newest_intact_step(self) -> int:
        return max(self.intact.values(), default=0)


def inventory(ckpt_dir: Path, loadable: bool = False) -> Inventory:
    """Recompute everything from the bytes on disk (size and checksum against the record, optionally torch.load)."""
    names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
    records: dict[str, Any] = {}
    for n in names:
        if n.endswith(COMMIT_SUFFIX) and not n.startswith("."):
            try:
                records[n[: -len(COMMIT_SUFFIX)]] = json.loads((ckpt_dir / n).read_text())
            except (OSError, ValueError):
                records[n[: -len(COMMIT_SUFFIX)]] = None
    intact: dict[str, int] = {}
    broken: list[str] = []
    for name, rec in records.items():
        path = ckpt_dir / name
        ok = (isinstance(rec, dict) and path.is_file() and path.stat().st_size == rec.get("bytes")
              and isinstance(rec.get("checksum"), str) and recorded_checksum_holds(path, rec["checksum"]))
        if ok and loadable:
            import torch

            try:
                ck = torch.load(path, map_location="cpu", weights_only=True)
                ok = ck.get("global_step") == rec.get("step")
            except Exception:  # noqa: BLE001 - any failure means not a usable checkpoint
                ok = False
        if ok:
            intact[name] = int(rec["step"])
        else:
            broken.append(name)
    temps = sorted(n for n in names if n.startswith(".tmp-"))
    orphans = sorted(n for n in names if CKPT_NAME.match(n) and n not in records)
    return Inventory(records, intact, broken, temps, orphans)


# =====================================================================================================
# Losses and final weights against an uninterrupted run
# =====================================================================================================
def load_losses(record: Path) -> tuple[dict[TraceKey, Any], dict[int, str]]:
    """A step trace's losses by (kind, rank, epoch, batch, step), and the final weights' digest by rank."""
    trace = read_trace(record)
    return trace.losses, trace.final


def merged_losses(records: Sequence[Path], starts: Sequence[int]) -> tuple[dict[TraceKey, Any], dict[int, str], list[TraceKey]]:
    """The losses of a preempted run, attempt by attempt: attempt k owns steps (start_k, start_k+1]."""
    merged: dict[TraceKey, Any] = {}
    duplicates: list[TraceKey] = []
    final: dict[int, str] = {}
    for k, record in enumerate(records):
        lo = starts[k]
        hi = starts[k + 1] if k + 1 < len(starts) else float("inf")
        losses, fin = load_losses(record)
        for key, loss in losses.items():
            if lo < key[4] <= hi:
                if key in merged:
                    duplicates.append(key)
                merged[key] = loss
        if k == len(records) - 1:
            final = fin
    return merged, final, duplicates


def compare_to_reference(records: Sequence[Path], starts: Sequence[int], reference: Path,
                         killed: Sequence[int] = ()) -> Optional[str]:
    """None when every loss and the final weights are bitwise those of the uninterrupted reference run.

    An attempt in ``killed`` may lack the loss of its very last step (SIGKILL after the commit, before the
    step's loss was recorded); the final weights are compared in any case.
    """
    got, final, dup = merged_losses(records, starts)
    want, want_final = load_losses(reference)
    excused = {starts[k + 1] for k in killed if k + 1 < len(starts)}
    if dup:
        return f"steps trained twice: {dup[:3]}"
    missing = sorted(k for k in set(want) - set(got) if k[4] not in excused)
    extra = sorted(set(got) - set(want))
    if missing or extra:
        return f"missing {missing[:3]}, extra {extra[:3]}"
    differ = [k for k in sorted(got) if got[k] != want[k]]
    if differ:
        return f"{len(differ)} losses differ, first at {differ[0]}"
    if final != want_final:
        return f"final weights differ: {final} vs {want_final}"
    return None
