"""The checkpoint store: atomic writes, commit records, validation, quarantine and retention.

Layout of ``<run_dir>/checkpoints/``::

    step-000000120.ckpt              the checkpoint (a file, written by whatever the trainer uses)
    step-000000120.ckpt.commit.json  its commit record, written last
    quarantine/                      invalid checkpoints moved aside, never deleted

A checkpoint *exists* only once its commit record does. The record is written after the data
file has been fsynced and renamed into place, so a crash at any moment leaves either a complete,
committed checkpoint or a temp file that no reader will ever pick up.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

# The checksum machinery lives in its own module (see there why); its names stay importable from here.
from preemptible.core import checksums as _checksums
from preemptible.core.checksums import CHECKSUMS, HashingFile, file_checksum
from preemptible.core.fsutil import atomic_write_json, fsync_dir, pid_alive, read_json, temp_name
from preemptible.core.schema import COMMIT_SUFFIX, CommitRecord

__all__ = [
    "CHECKSUMS", "COMMIT_SUFFIX", "CheckpointError", "CheckpointStore", "CommitRecord", "InvalidCheckpoint", "PendingCheckpoint",
    "StoredCheckpoint", "file_checksum", "library_versions",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})(?:\.(\d+))?\.ckpt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or is not usable; the message says which and why."""


class InvalidCheckpoint(CheckpointError):
    """A committed checkpoint failed validation (size, checksum or unreadable record)."""


@dataclass(frozen=True)
class StoredCheckpoint:
    """A committed checkpoint as listed by :meth:`CheckpointStore.committed` (not yet validated)."""

    path: Path
    record: CommitRecord

    @property
    def step(self) -> int:
        return self.record.step

    @property
    def record_path(self) -> Path:
        return self.path.with_name(self.path.name + COMMIT_SUFFIX)


#: The trainer packages a commit record names when the writing process imported them (module → distribution).
TRAINER_DISTRIBUTIONS = {"lightning": "lightning", "pytorch_lightning": "pytorch-lightning"}


def library_versions() -> dict[str, str]:
    """The versions in use in this process: Python, preemptible, torch, and each Lightning it imported."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    in_use = [dist for module, dist in TRAINER_DISTRIBUTIONS.items() if module in sys.modules]
    for dist in ("preemptible", "torch", *in_use):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


class PendingCheckpoint:
    """A checkpoint being written: data goes to :attr:`temp_path`, then :meth:`CheckpointStore.commit`."""

    def __init__(self, final_path: Path, step: int) -> None:
        self.final_path = final_path
        self.temp_path = temp_name(final_path)
        self.step = step
        self.started = time.monotonic()
        self.checksum: str | None = None


class CheckpointStore:
    """Atomic, validated checkpoints in one directory.

    Args:
        directory: where checkpoints live (created with mode 0700 if missing).
        keep: how many committed checkpoints to keep; at least 2, so that a checkpoint which turns
            out to be damaged always has a predecessor.
        checksum: algorithm for new checkpoints, ``"crc32"`` or ``"sha256"`` (see :data:`CHECKSUMS`);
            existing checkpoints are checked with whatever their record names.

    Example::

        store = CheckpointStore("runs/exp1/checkpoints")
        pending = store.begin(step=120)
        with store.open_for_write(pending) as f:
            torch.save(state, f)
        store.commit(pending, CommitRecord(...))
        store.latest_valid()  # -> StoredCheckpoint for step 120
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 2, checksum: str = "crc32") -> None:
        if keep < 2:
            raise ValueError(f"keep={keep}: at least 2 checkpoints are always kept (a damaged newest one needs a fallback)")
        _checksums.checksummer(checksum)
        self.directory = Path(directory)
        self.keep = keep
        self.checksum = checksum

    # -- writing ----------------------------------------------------------------------------------
    def begin(self, step: int) -> PendingCheckpoint:
        """Reserve a file name for a checkpoint at ``step`` (never one that is already committed)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        base = self.directory / f"step-{step:09d}.ckpt"
        path, n = base, 0
        while path.exists() or path.with_name(path.name + COMMIT_SUFFIX).exists():
            n += 1
            path = base.with_name(f"step-{step:09d}.{n}.ckpt")
        return PendingCheckpoint(path, step)

    def write(self, pending: PendingCheckpoint, writer: Callable[[IO[bytes]], None]) -> None:
        """Stream the checkpoint through ``writer(file)`` into the temp file, checksumming on the way, fsync once."""
        hashing: Optional[HashingFile] = None
        try:
            with open(pending.temp_path, "wb") as raw:
                hashing = HashingFile(raw, self.checksum)
                try:
                    writer(hashing)  # type: ignore[arg-type]
                    raw.flush()
                    os.fsync(raw.fileno())
                finally:
                    hashing.close_hash()
            pending.checksum = None if hashing.seeked else hashing.checksum()
        except BaseException as exc:
            self.abort(pending)
            # A serializer may turn the disk's error into its own (torch.save: a RuntimeError about zip
            # positions); the OSError seen by the file is the cause the user needs to read.
            cause = exc if isinstance(exc, OSError) else (hashing.error if hashing is not None else None)
            if cause is not None:
                raise CheckpointError(
                    f"writing checkpoint {pending.final_path.name} failed: {cause}. The previous checkpoints are "
                    f"untouched; free space or fix permissions in {self.directory} and run again."
                ) from exc
            raise

    def abort(self, pending: PendingCheckpoint) -> None:
        """Remove what a failed write left behind (committed checkpoints are never touched)."""
        if pending.temp_path.is_dir():
            shutil.rmtree(pending.temp_path, ignore_errors=True)
        else:
            pending.temp_path.unlink(missing_ok=True)

    def commit(self, pending: PendingCheckpoint, record: CommitRecord) -> StoredCheckpoint:
        """fsync, rename into place, then write the commit record: from here on the checkpoint exists."""
        tmp = pending.temp_path
        if not tmp.is_file():
            raise CheckpointError(f"nothing was written to {tmp}: the trainer's save did not produce a file")
        try:
            if pending.checksum is None:  # written by the trainer itself, or by a writer that seeked back
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                pending.checksum = file_checksum(tmp, self.checksum)
            record.file = pending.final_path.name
            record.step = pending.step
            record.bytes = tmp.stat().st_size
            record.checksum = pending.checksum
            record.time = time.time()
            record.save_seconds = round(time.monotonic() - pending.started, 6)
            record.host = record.host or socket.gethostname()
            record.versions = record.versions or library_versions()
            os.replace(tmp, pending.final_path)
            fsync_dir(self.directory)
            atomic_write_json(pending.final_path.with_name(pending.final_path.name + COMMIT_SUFFIX), asdict(record))
        except OSError as exc:
            self.abort(pending)
            record_path = pending.final_path.with_name(pending.final_path.name + COMMIT_SUFFIX)
            if not record_path.exists():
                # Renamed but never committed: it does not exist as a checkpoint, so removing it loses nothing.
                pending.final_path.unlink(missing_ok=True)
            raise CheckpointError(
                f"committing checkpoint {pending.final_path.name} failed: {exc}. Earlier checkpoints are intact."
            ) from exc
        return StoredCheckpoint(pending.final_path, record)

    # -- reading ----------------------------------------------------------------------------------
    def committed(self) -> list[StoredCheckpoint]:
        """Committed checkpoints, oldest first (by step, then commit time). Not validated."""
        if not self.directory.is_dir():
            return []
        found: list[StoredCheckpoint] = []
        for record_path in self.directory.glob("step-*.ckpt" + COMMIT_SUFFIX):
            path = record_path.with_name(record_path.name[: -len(COMMIT_SUFFIX)])
            try:
                record = self._read_record(record_path)
            except InvalidCheckpoint as exc:
                # A damaged record still marks an entry; it is reported and quarantined by latest_valid().
                record = CommitRecord(file=path.name, step=_step_from_name(path.name), bytes=-1, checksum="",
                                      extra={"error": str(exc)})
            found.append(StoredCheckpoint(path, record))
        found.sort(key=lambda c: (c.record.step, c.record.time, c.path.name))
        return found

    @staticmethod
    def _read_record(record_path: Path) -> CommitRecord:
        try:
            raw = _checksums.upgrade_legacy_record(read_json(record_path))  # records of preemptible 0.1.0 named only a sha256
            known = {k: raw[k] for k in CommitRecord.__dataclass_fields__ if k in raw}
            record = CommitRecord(**known)
            if not isinstance(record.step, int) or not isinstance(record.bytes, int):
                raise ValueError("missing step or bytes")
            _checksums.recorded_algorithm(record.checksum)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InvalidCheckpoint(f"commit record {record_path} is unreadable: {exc}") from exc
        return record

    def validate(self, ckpt: StoredCheckpoint, checksum: bool = True) -> None:
        """Raise :class:`InvalidCheckpoint` naming the file and the problem, or return quietly."""
        if "error" in ckpt.record.extra:
            raise InvalidCheckpoint(ckpt.record.extra["error"])
        if not ckpt.path.is_file():
            raise InvalidCheckpoint(f"{ckpt.path} is listed in its commit record but the file is missing")
        size = ckpt.path.stat().st_size
        if size != ckpt.record.bytes:
            raise InvalidCheckpoint(f"{ckpt.path} has {size} bytes, its commit record says {ckpt.record.bytes} "
                                    "(truncated or overwritten)")
        if checksum:
            algorithm = ckpt.record.checksum.partition(":")[0]
            if file_checksum(ckpt.path, algorithm) != ckpt.record.checksum:
                raise InvalidCheckpoint(f"{ckpt.path} fails its {algorithm} checksum (content damaged after it was committed)")

    def valid_newest_first(self, checksum: bool = True, quarantine: bool = True) -> Iterator[StoredCheckpoint]:
        """Yield valid committed checkpoints newest first, reporting (and optionally quarantining) the rest."""
        for ckpt in reversed(self.committed()):
            try:
                self.validate(ckpt, checksum=checksum)
            except InvalidCheckpoint as exc:
                action = "moved to quarantine/" if quarantine else "skipped"
                warnings.warn(f"preemptible: ignoring invalid checkpoint: {exc}; {action}, trying the previous one", stacklevel=2)
                if quarantine:
                    self.quarantine(ckpt)
                continue
            yield ckpt

    def latest_valid(self, checksum: bool = True, quarantine: bool = True) -> StoredCheckpoint | None:
        """The newest committed checkpoint that passes validation, or ``None``."""
        return next(self.valid_newest_first(checksum=checksum, quarantine=quarantine), None)

    # -- housekeeping ----------------------------------------------------------------------------
    def quarantine(self, ckpt: StoredCheckpoint) -> Path | None:
        """Move a bad checkpoint and its record aside (never delete: an operator may want to look)."""
        target = self.directory / "quarantine"
        target.mkdir(exist_ok=True, mode=0o700)
        # unique: never overwrite an earlier one
        stamp = time.strftime("%Y%m%dT%H%M%S") + f".{time.time_ns() % 1_000_000_000:09d}"
        moved = None
        for p in (ckpt.path, ckpt.record_path):
            try:
                dest = target / f"{p.name}.{stamp}"
                os.replace(p, dest)
                moved = moved or dest
            except FileNotFoundError:
                pass  # another rank got there first, or the file was already gone
        return moved

    def prune(self, protect: set[Path] | None = None) -> list[Path]:
        """Delete committed checkpoints beyond the newest :attr:`keep` (never a protected one)."""
        protect = {p.resolve() for p in (protect or set())}
        ordered = self.committed()
        valid_looking = [c for c in ordered if "error" not in c.record.extra]
        removed: list[Path] = []
        for ckpt in valid_looking[: max(0, len(valid_looking) - self.keep)]:
            if ckpt.path.resolve() in protect:
                continue
            # Record first: a checkpoint without its record no longer exists, so a crash between the
            # two unlinks leaves an inert data file, never a record pointing at nothing.
            ckpt.record_path.unlink(missing_ok=True)
            ckpt.path.unlink(missing_ok=True)
            removed.append(ckpt.path)
        if removed:
            fsync_dir(self.directory)
        return removed

    def clean_stale_temps(self) -> list[Path]:
        """Remove temp files whose writer died (same host, pid gone); a live writer's temp file is left alone."""
        removed: list[Path] = []
        if not self.directory.is_dir():
            return removed
        host = socket.gethostname()
        for tmp in self.directory.glob(".tmp-*"):
            writer_host, _, pid = tmp.name.rpartition(".")
            if writer_host.endswith("." + host) and pid.isdigit() and not pid_alive(int(pid)):
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
        return removed


    def quarantine_orphans(self, older_than: float = 60.0) -> list[Path]:
        """Report and move aside data files without a commit record (a writer killed between rename and record).

        They were never committed, so they are not checkpoints; moving them keeps a full disk from
        staying full and leaves them for an operator to look at. Files younger than ``older_than``
        seconds are left alone: a live writer may be about to commit one.
        """
        if not self.directory.is_dir():
            return []
        moved = []
        now = time.time()
        for path in self.directory.glob("step-*.ckpt"):
            record = path.with_name(path.name + COMMIT_SUFFIX)
            try:
                young = now - path.stat().st_mtime < older_than
            except FileNotFoundError:
                continue
            if record.exists() or young:
                continue
            warnings.warn(f"preemptible: {path} has no commit record (its writer was killed before committing it); "
                          "it was never a checkpoint and is moved to quarantine/", stacklevel=2)
            target = self.quarantine(StoredCheckpoint(path, CommitRecord(file=path.name, step=-1, bytes=-1, checksum="")))
            if target is not None:
                moved.append(target)
        return moved


def _step_from_name(name: str) -> int:
    m = _NAME.match(name)
    return int(m.group(1)) if m else -1
