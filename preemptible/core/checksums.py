"""Checksums of checkpoint files: the algorithms, whole-file checks and the streaming writer.

Kept apart from :mod:`preemptible.core.store` because it is a different concern with different
constraints: the store decides *what* exists (temp file, rename, commit record, quarantine,
retention) and must stay easy to audit for crash safety, while this module is the hot path of the
emergency save (the bytes are checksummed while they are written, on a helper thread, with early
writeback to the disk) and is tuned for throughput. Neither needs the other's details: the store
only wraps its temp file in :class:`HashingFile`, reads :meth:`HashingFile.checksum` and checks old
files with :func:`file_checksum`.

The names other code uses (:data:`CHECKSUMS`, :func:`file_checksum`) stay importable from
:mod:`preemptible.core.store`, where they lived before.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Callable, Optional, Protocol

from preemptible.core.fsutil import start_writeback

__all__ = ["CHECKSUMS", "Checksum", "HashingFile", "checksummer", "file_checksum", "recorded_algorithm", "upgrade_legacy_record"]

_CHUNK = 8 << 20


class Checksum(Protocol):
    """What the store needs of a running checksum (hashlib's interface)."""

    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


class _Crc32:
    """zlib's CRC-32 behind hashlib's interface: the code zip, gzip and PNG use against accidental damage.

    It detects every error burst of up to 32 bits and misses other random damage (a torn or
    overwritten block) with probability 2**-32, at two to three times sha256's speed; zlib releases
    the GIL while computing it.
    """

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: Any, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


CHECKSUMS: dict[str, Callable[[], Checksum]] = {"crc32": _Crc32, "sha256": hashlib.sha256}
"""Checksum algorithms for new checkpoints: ``crc32`` (default) or ``sha256`` (a cryptographic digest,
e.g. to compare with one kept elsewhere; slower to write and to check). Both detect damage, not
tampering: whoever can rewrite a checkpoint can rewrite its commit record too."""


def checksummer(algorithm: str) -> Checksum:
    """A fresh running checksum of ``algorithm``; ``ValueError`` naming the known ones otherwise."""
    try:
        return CHECKSUMS[algorithm]()
    except KeyError:
        raise ValueError(f"checksum={algorithm!r} is not known: use one of {sorted(CHECKSUMS)}") from None


def file_checksum(path: str | os.PathLike[str], algorithm: str) -> str:
    """``"<algorithm>:<hex>"`` of a file's bytes, as stored in commit records."""
    h = checksummer(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def upgrade_legacy_record(raw: dict[str, Any]) -> dict[str, Any]:
    """Give a commit record of preemptible 0.1.0 (a bare ``sha256`` field) today's ``checksum`` field, in place."""
    if "checksum" not in raw and raw.get("sha256"):
        raw["checksum"] = f"sha256:{raw['sha256']}"
    return raw


def recorded_algorithm(checksum: object) -> str:
    """The algorithm of a recorded ``"<algorithm>:<hex>"``; ``ValueError`` if it is missing or unknown."""
    algorithm, _, digest = str(checksum).partition(":")
    if algorithm not in CHECKSUMS or not digest:
        raise ValueError(f"checksum {checksum!r} is missing or of an unknown kind (known: {sorted(CHECKSUMS)})")
    return algorithm


class HashingFile:
    """A write-only file wrapper that checksums the bytes as they go to disk, without copying them.

    A checksum runs at 1-3 GB/s, a page-cache write about as fast: one after the other, they would
    take twice as long as either. So a large buffer is checksummed on a helper thread *while* this
    thread writes the same buffer (zlib, hashlib and the write syscall all release the GIL), and
    ``write`` returns only when both are done: the caller may reuse its buffer afterwards, and the
    bytes are checksummed in the order they were written. Small buffers (pickle frames, zip headers)
    are checksummed inline, where a hand-off to the thread would cost more.

    Large buffers are written in slices, and the kernel is asked to start writing each slice to the
    disk right away (:func:`~preemptible.core.fsutil.start_writeback`), so that the disk works while the
    serializer produces the rest instead of all at once in the final ``fsync``.
    """

    _INLINE = 1 << 20
    _SLICE = 32 << 20

    def __init__(self, f: IO[bytes], algorithm: str) -> None:
        self._f = f
        self.algorithm = algorithm
        self._hash = checksummer(algorithm)
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preemptible-checksum")
        try:
            self._fd: Optional[int] = f.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None
        self._written_back = 0  # bytes before this offset were handed to the disk already
        self.bytes = 0
        self.seeked = False
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        hashed: Optional[Future[None]] = None
        if len(view) >= self._INLINE:
            hashed = self._helper.submit(self._hash.update, view)
        else:
            self._hash.update(view)
        try:
            for start in range(0, len(view), self._SLICE):
                piece = view[start:start + self._SLICE]
                self._f.write(piece)
                self.bytes += len(piece)
                if hashed is not None:
                    self._start_writeback()
        except OSError as exc:
            # torch.save reports a failed write as a RuntimeError about zip positions; keep the real cause.
            self.error = exc
            raise
        finally:
            if hashed is not None:
                hashed.result()
        return len(view)

    def _start_writeback(self) -> None:
        if self._fd is None or self.seeked:
            return
        self._f.flush()  # small writes still in the file object's buffer come first
        if not start_writeback(self._fd, self._written_back, self.bytes - self._written_back):
            self._fd = None
        self._written_back = self.bytes

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, *args: Any) -> int:
        # A writer that seeks back rewrites bytes we already hashed: fall back to re-reading.
        self.seeked = True
        return self._f.seek(*args)

    def close_hash(self) -> None:
        """Stop the helper thread (always called, also when the write failed)."""
        self._helper.shutdown(wait=True)

    def checksum(self) -> str:
        self.close_hash()
        return f"{self.algorithm}:{self._hash.hexdigest()}"
