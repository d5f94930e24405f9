"""Small filesystem helpers for crash-safe writes (shared by the store, the run record and the journal)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable (POSIX needs an fsync of the directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None  # resolved on first use; False where the platform has none


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` to the disk now, without waiting.

    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: the disk then works while the writer is
    still serializing the rest, and the final ``fsync`` (still required: this makes nothing durable,
    not even the file's metadata) finds most pages already written. Returns ``False`` where it is not
    available (other systems, some network filesystems): the caller just stops asking.
    """
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sync_file_range = fn
        except (OSError, AttributeError):
            _sync_file_range = False
    if not _sync_file_range or nbytes <= 0:
        return bool(_sync_file_range)
    started: int = _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
    return started == 0


def temp_name(final: Path) -> Path:
    """A temp path in the same directory as ``final`` (so the rename is atomic), unique per writer."""
    return final.with_name(f".tmp-{final.name}.{socket.gethostname()}.{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or the new, never a torn mix."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
