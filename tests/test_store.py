"""The checkpoint store: atomic commit, validation on load, quarantine, retention."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from preemptible.core.store import CheckpointError, CheckpointStore, CommitRecord, InvalidCheckpoint, file_checksum


def _save(store: CheckpointStore, step: int, payload: bytes = b"x" * 1000):
    pending = store.begin(step)
    store.write(pending, lambda f: f.write(payload + str(step).encode()))
    return store.commit(pending, CommitRecord(file="", step=step, bytes=0, checksum="", reason="test"))


def test_commit_record_is_written_last_and_describes_the_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    stored = _save(store, 7)
    record = json.loads(stored.record_path.read_text())
    assert record["step"] == 7 and record["bytes"] == stored.path.stat().st_size
    assert record["reason"] == "test" and "torch" in record["versions"]
    assert record["checksum"] == file_checksum(stored.path, "crc32") and record["checksum"].startswith("crc32:")
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


@pytest.mark.parametrize("algorithm", ["crc32", "sha256"])
def test_streamed_checksum_matches_the_bytes_on_disk(tmp_path: Path, algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small writes are checksummed inline, large ones on the helper thread while being written in
    slices (each handed to the disk early): the record must still describe the file byte for byte, in
    order, and damage anywhere must be caught."""
    import random

    from preemptible.core import checksums
    from preemptible.core import store as store_module

    assert store_module.HashingFile is checksums.HashingFile, "the store writes through the checksum module's wrapper"
    monkeypatch.setattr(checksums.HashingFile, "_SLICE", 1 << 20)  # several slices per large write
    rng = random.Random(3)
    pieces = [rng.randbytes(n) for n in (10, 3 << 20, 7, 1 << 20, (1 << 20) - 1, 5 << 20, 1)]
    store = CheckpointStore(tmp_path, checksum=algorithm)
    pending = store.begin(1)

    def writer(f) -> None:
        for piece in pieces:
            buffer = bytearray(piece)
            f.write(memoryview(buffer))
            buffer[:] = b"\0" * len(buffer)  # a writer may reuse its buffer once write() returns

    store.write(pending, writer)
    stored = store.commit(pending, CommitRecord(file="", step=1, bytes=0, checksum=""))
    assert stored.path.read_bytes() == b"".join(pieces)
    assert stored.record.checksum == file_checksum(stored.path, algorithm) and stored.record.checksum.startswith(algorithm + ":")
    store.validate(stored)
    data = bytearray(stored.path.read_bytes())
    data[(4 << 20) + 123] ^= 0x10
    stored.path.write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpoint, match=f"fails its {algorithm} checksum"):
        store.validate(stored)


def test_records_of_version_0_1_with_a_sha256_field_are_still_checked(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, checksum="sha256")
    stored = _save(store, 4)
    record = json.loads(stored.record_path.read_text())
    digest = record.pop("checksum").partition(":")[2]
    record["sha256"] = digest  # how 0.1.0 wrote it
    stored.record_path.write_text(json.dumps(record))
    crc_store = CheckpointStore(tmp_path)  # the algorithm for new checkpoints does not matter for old ones
    assert crc_store.latest_valid().path == stored.path
    stored.path.write_bytes(stored.path.read_bytes()[:-1] + b"?")
    with pytest.raises(InvalidCheckpoint, match="fails its sha256 checksum"):
        crc_store.validate(crc_store.committed()[-1])


def test_unknown_checksum_kinds_are_refused_with_the_known_ones_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"checksum='md5' is not known: use one of \['crc32', 'sha256'\]"):
        CheckpointStore(tmp_path, checksum="md5")
    store = CheckpointStore(tmp_path)
    good = _save(store, 1)
    odd = _save(store, 2)
    record = json.loads(odd.record_path.read_text())
    record["checksum"] = "md5:abc"
    odd.record_path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="unknown kind"):
        assert store.latest_valid().path == good.path


def test_torch_checkpoints_are_written_without_the_zip_crc_and_load(tmp_path: Path) -> None:
    """torch.load never checks the zip's CRC-32s; the store's checksum covers the file instead, so the
    save skips computing them. The file must load, and the store must catch damage to tensor bytes."""
    import zipfile

    import torch

    from preemptible.core.checkpointing import torch_save_without_zip_crc

    state = {"w": torch.arange(300_000, dtype=torch.float32), "step": 5}
    store = CheckpointStore(tmp_path)
    pending = store.begin(5)
    store.write(pending, lambda f: torch_save_without_zip_crc(state, f))
    stored = store.commit(pending, CommitRecord(file="", step=5, bytes=0, checksum=""))
    loaded = torch.load(stored.path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 5
    with zipfile.ZipFile(stored.path) as z:
        assert [i.CRC for i in z.infolist() if i.filename.endswith("data/0")] == [0], "torch's CRC was skipped"
    with open(stored.path, "r+b") as f:
        f.seek(stored.record.bytes // 2)
        byte = f.read(1)
        f.seek(stored.record.bytes // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(UserWarning, match="fails its crc32 checksum"):
        assert store.latest_valid() is None
    from torch.utils.serialization import config

    assert config.save.compute_crc32, "torch's setting is restored for everybody else's saves"


def test_early_writeback_is_available_on_linux(tmp_path: Path) -> None:
    """The store asks the kernel to start writing each slice at once (sync_file_range); on Linux that
    must be in effect, not silently off, or every save pays the whole disk flush at its end."""
    import sys

    from preemptible.core.fsutil import start_writeback

    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        assert start_writeback(f.fileno(), 0, 100_000) is (sys.platform == "linux")
