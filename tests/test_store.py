"""The checkpoint store: atomic commit, validation on load, quarantine, retention."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from preemptible.store import CheckpointError, CheckpointStore, CommitRecord, InvalidCheckpoint


def _save(store: CheckpointStore, step: int, payload: bytes = b"x" * 1000):
    pending = store.begin(step)
    store.write(pending, lambda f: f.write(payload + str(step).encode()))
    return store.commit(pending, CommitRecord(file="", step=step, bytes=0, sha256="", reason="test"))


def test_commit_record_is_written_last_and_describes_the_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    stored = _save(store, 7)
    record = json.loads(stored.record_path.read_text())
    assert record["step"] == 7 and record["bytes"] == stored.path.stat().st_size
    assert record["reason"] == "test" and "torch" in record["versions"] and record["sha256"]
    assert not list((tmp_path / "ckpt").glob(".tmp-*")), "no temp file left behind"
    assert store.latest_valid().path == stored.path


def test_a_file_without_commit_record_does_not_exist(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    first = _save(store, 1)
    (tmp_path / "step-000000002.ckpt").write_bytes(b"renamed but never committed")
    assert [c.step for c in store.committed()] == [1]
    assert store.latest_valid().path == first.path


@pytest.mark.parametrize("damage", ["truncate", "flip", "zero", "garbage_record", "missing_file"])
def test_damaged_newest_is_reported_quarantined_and_previous_used(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(tmp_path)
    good = _save(store, 1)
    bad = _save(store, 2)
    if damage == "truncate":
        bad.path.write_bytes(bad.path.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(bad.path.read_bytes())
        data[5] ^= 1
        bad.path.write_bytes(bytes(data))
    elif damage == "zero":
        bad.path.write_bytes(b"")
    elif damage == "garbage_record":
        bad.record_path.write_text("{not json")
    elif damage == "missing_file":
        bad.path.unlink()
    with pytest.warns(UserWarning, match=bad.path.name):
        found = store.latest_valid()
    assert found is not None and found.path == good.path
    quarantined = [p.name for p in (tmp_path / "quarantine").iterdir()]
    assert any(n.startswith(bad.record_path.name) for n in quarantined)
    assert good.path.exists(), "a good checkpoint is never touched"


def test_validate_names_the_problem(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    stored = _save(store, 3)
    stored.path.write_bytes(stored.path.read_bytes() + b"tail")
    with pytest.raises(InvalidCheckpoint, match=r"has \d+ bytes, its commit record says \d+"):
        store.validate(stored)


def test_read_only_listing_does_not_move_files(tmp_path: Path) -> None:
    from preemptible import latest_checkpoint

    store = CheckpointStore(tmp_path / "checkpoints")
    good = _save(store, 1)
    bad = _save(store, 2)
    bad.path.write_bytes(b"")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path) == good.path
    assert bad.path.exists() and not (tmp_path / "checkpoints" / "quarantine").exists()


def test_retention_keeps_at_least_two_and_the_protected_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        CheckpointStore(tmp_path, keep=1)
    store = CheckpointStore(tmp_path, keep=2)
    saved = [_save(store, s) for s in (1, 2, 3, 4)]
    removed = store.prune(protect={saved[0].path})
    assert saved[1].path in removed and saved[0].path not in removed
    assert [c.step for c in store.committed()] == [1, 3, 4]


def test_same_step_never_overwrites_a_committed_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    a = _save(store, 5, b"a")
    b = _save(store, 5, b"b")
    assert a.path != b.path and a.path.exists() and b.path.exists()
    assert store.latest_valid().path == b.path


def test_failed_write_leaves_nothing_and_keeps_previous(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    good = _save(store, 1)
    pending = store.begin(2)

    def broken(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device"):
        store.write(pending, broken)
    assert not pending.temp_path.exists()
    assert store.latest_valid().path == good.path


def test_stale_temp_of_dead_writer_is_cleaned(tmp_path: Path) -> None:
    import socket

    store = CheckpointStore(tmp_path)
    dead = tmp_path / f".tmp-step-000000003.ckpt.{socket.gethostname()}.999999999"
    live = tmp_path / f".tmp-step-000000004.ckpt.{socket.gethostname()}.{os.getpid()}"
    dead.write_bytes(b"x")
    live.write_bytes(b"y")
    assert store.clean_stale_temps() == [dead]
    assert live.exists()


def test_data_file_without_record_is_reported_and_moved_aside(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    good = _save(store, 1)
    orphan = tmp_path / "step-000000002.ckpt"
    orphan.write_bytes(b"renamed, then the writer was killed before the commit record")
    old = os.path.getmtime(orphan) - 3600
    os.utime(orphan, (old, old))
    young = tmp_path / "step-000000003.ckpt"
    young.write_bytes(b"a live writer may commit this any moment")
    with pytest.warns(UserWarning, match="has no commit record"):
        moved = store.quarantine_orphans()
    assert len(moved) == 1 and not orphan.exists() and young.exists() and good.path.exists()
