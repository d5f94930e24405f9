"""The two-phase save: every rank at the same step, one checkpoint through the atomic store.

Phase one runs on every rank in lockstep: gather every rank's own state (RNG, data position),
global rank 0 opens the store's temp file and broadcasts its path, the trainer dumps its checkpoint
(``Snapshot.dump``) and it is written (streamed by ``torch.save`` from rank 0, or through the
trainer's own ``Snapshot.write`` for strategies that write from every rank). Phase two: rank 0
commits (record, retention, journal), and all ranks agree whether any of them failed, so that no
rank leaves believing in a checkpoint another rank could not write.

What the trainer offers is the small :class:`Snapshot` protocol; nothing here knows Lightning.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from preemptible.core.agreement import StopAgreement
from preemptible.core.rundir import RunDirectory
from preemptible.core.schema import REASON_FINISHED, REASON_PERIODIC, STATE_FORMAT, STATE_KEY, CommitRecord, Event
from preemptible.core.store import CheckpointError, CheckpointStore, PendingCheckpoint, StoredCheckpoint


class Snapshot(Protocol):
    """What a training loop hands the session at a save (see :class:`preemptible.core.session.PreemptionSession`).

    Attributes:
        streams: ``True`` when ``dump()`` on global rank 0 *is* the whole checkpoint, which the
            store then streams into its temp file with ``torch.save`` (and may write in the
            background); ``False`` when :meth:`write` must be called on every rank.
    """

    streams: bool

    def rank_state(self) -> dict[str, Any]:
        """This rank's own small state (RNG, data position): gathered from every rank into the checkpoint."""

    def dump(self, rank_states: list[dict[str, Any]]) -> Any:
        """The checkpoint object, holding ``rank_states`` (every rank's, in rank order). Called on every rank."""

    def write(self, checkpoint: Any, path: str) -> None:
        """Write ``checkpoint`` to ``path`` through the trainer's own machinery (only when not :attr:`streams`)."""

    def parameter_bytes(self) -> int:
        """Bytes of the model's parameters (a size estimate before the first checkpoint)."""


def torch_save_without_zip_crc(obj: Any, f: Any) -> None:
    """``torch.save`` without the zip container's per-record CRC-32.

    ``torch.load`` never checks those CRCs, while the store checksums every byte of the file and
    checks it before a resume; computing both would add about 30 % to a save that is CPU-bound.
    The switch is torch's public serialization config (torch >= 2.6), read when the zip writer is
    created; older torch versions simply keep their CRCs.
    """
    try:
        from torch.utils.serialization import config as serialization_config
    except ImportError:
        serialization_config = None  # type: ignore[assignment]
    if serialization_config is None or not hasattr(serialization_config.save, "compute_crc32"):
        torch.save(obj, f)
        return
    with serialization_config.patch({"save.compute_crc32": False}):  # type: ignore[attr-defined]
        torch.save(obj, f)


def estimated_checkpoint_bytes(store: CheckpointStore, parameter_bytes: int) -> int:
    """The last committed checkpoint's size, else three times the parameters (weights + two optimizer moments)."""
    committed = store.committed()
    if committed and committed[-1].record.bytes > 0:
        return int(committed[-1].record.bytes)
    return 3 * parameter_bytes


class BackgroundWriter:
    """At most one checkpoint write in flight on a daemon thread (rank 0 of a periodic, asynchronous save).

    It also keeps the CPU copy of the state between saves (:meth:`stage`): copying into memory that
    was already allocated and touched is about twice as fast as allocating it anew (each new page
    is faulted in on first write), and the copy is what training waits for.

    A write that fails is never silent: ``on_failure`` journals it as it happens, and the error
    stays in :attr:`failure` until the next save or the end of training reports it (:meth:`take_failure`).
    """

    def __init__(self, on_failure: Optional[Callable[[BaseException, int], None]] = None) -> None:
        self._thread: Optional[threading.Thread] = None
        self._staging: dict[tuple[Any, ...], torch.Tensor] = {}
        self._on_failure = on_failure
        self.failure: Optional[BaseException] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stage(self, checkpoint: Any) -> Any:
        """A copy of ``checkpoint`` that training can no longer change, tensors in reused CPU buffers.

        Only called when no write is in flight (the caller skips a periodic save while :attr:`busy`),
        so no buffer is overwritten while the previous checkpoint is still being written from it.
        """
        if self.busy:
            raise RuntimeError("preemptible: a checkpoint is still being written from the staging buffers")
        seen: set[tuple[Any, ...]] = set()
        staged = _cpu_copy(checkpoint, self._staging, seen, ())
        for key in set(self._staging) - seen:  # tensors the state no longer has (e.g. a rebuilt optimizer)
            del self._staging[key]
        return staged

    def submit(self, work: Callable[[], None], step: int) -> None:
        """Run ``work`` (write and commit the checkpoint of ``step``) on the writer thread."""
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - journaled now, reported by the next save
                self.failure = CheckpointError(f"the background checkpoint at step {step} failed: {exc!r}; "
                                               "the previous checkpoints are intact")
                print(f"preemptible: {self.failure}", flush=True)
                if self._on_failure is not None:
                    try:
                        self._on_failure(exc, step)
                    except Exception as journal_error:  # noqa: BLE001 - e.g. the same full disk: still reported at the next save
                        print(f"preemptible: could not journal that failure: {journal_error}", flush=True)

        self._thread = threading.Thread(target=run, name="preemptible-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Let a write in flight finish (an emergency save must not race it for the same directory)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def take_failure(self) -> Optional[BaseException]:
        """The error of a background write that failed since the last call, once."""
        failure, self.failure = self.failure, None
        return failure


def _cpu_copy(obj: Any, staging: dict[tuple[Any, ...], torch.Tensor], seen: set[tuple[Any, ...]],
              where: tuple[Any, ...]) -> Any:
    """A copy of the checkpoint that training can no longer change: tensors copied to CPU, into the
    buffer ``staging`` holds for the same place in the structure when it has the same shape and dtype."""
    if isinstance(obj, torch.Tensor):
        source = obj.detach()
        buffer = staging.get(where)
        plain = source.layout == torch.strided and type(source) is torch.Tensor
        if plain and buffer is not None and buffer.shape == source.shape and buffer.dtype == source.dtype:
            buffer.copy_(source)
        elif plain and source.is_cuda:
            # Pinned host memory: copies from the device run at full speed into it.
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            buffer.copy_(source)
        else:
            buffer = source.to("cpu", copy=True)
        staging[where] = buffer
        seen.add(where)
        return buffer
    if isinstance(obj, dict):
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _cpu_copy(value, staging, seen, where + (key,))
        if hasattr(obj, "_metadata"):  # state_dict versions, read by load_state_dict
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [_cpu_copy(v, staging, seen, where + (i,)) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_cpu_copy(v, staging, seen, where + (i,)) for i, v in enumerate(obj))
    return obj


def save_checkpoint(run: RunDirectory, agreement: StopAgreement, snapshot: Snapshot, *, step: int, epoch: int,
                    reason: str, world_size: int, is_global_zero: bool, protect: set[Optional[Path]],
                    signal_at: Optional[float] = None,
                    background: Optional[BackgroundWriter] = None) -> Optional[StoredCheckpoint]:
    """All ranks call this at the same step; returns the committed checkpoint (rank 0's record; the path elsewhere).

    With ``background`` (periodic saves), rank 0 copies the state to CPU memory and writes it on a
    thread while training goes on; ``None`` is returned and the commit is journaled when it lands.
    Snapshots that write through the trainer's own machinery are always saved synchronously.
    """
    started = time.time()
    if background is not None and not snapshot.streams:
        background = None
    if is_global_zero:
        _say_if_short_of_space(run, snapshot)
    rank_state = dict(snapshot.rank_state(), signal_at=signal_at)
    # A stop vote issued at this boundary (and, in deferred mode, one only cast) is left alone: every rank
    # issued or cast it before this gather, so the group runs the collectives in the same order everywhere.
    states = agreement.gather(rank_state)
    store = run.store
    pending = store.begin(step) if is_global_zero else None
    temp, final = agreement.broadcast((str(pending.temp_path), str(pending.final_path)) if pending else None)
    error: Optional[BaseException] = None
    checkpoint: Any = None
    copy_seconds = 0.0
    try:
        checkpoint = snapshot.dump(states)
        if background is not None:
            copy_started = time.time()
            checkpoint = background.stage(checkpoint) if pending is not None else None
            copy_seconds = time.time() - copy_started
        elif snapshot.streams:
            if pending is not None:
                store.write(pending, lambda f: torch_save_without_zip_crc(checkpoint, f))
            checkpoint = None  # the dump is not held through the commit and the agreement
        else:
            snapshot.write(checkpoint, temp)
            checkpoint = None
    except Exception as exc:  # noqa: BLE001 - every rank must learn of the failure, then it is re-raised
        error = exc

    signal_times = [s.get("signal_at") for s in states if s.get("signal_at")]
    record = CommitRecord(
        file="", step=step, bytes=0, checksum="", epoch=epoch, reason=reason,
        world_size=world_size, job_id=run.env.job_id, restart_count=run.env.restart_count,
        extra={"signal_at": min(signal_times) if signal_times else None, "save_started_at": started,
               "background": background is not None},
    )
    protected = {p for p in protect if p}
    stored: Optional[StoredCheckpoint] = None
    if pending is not None and error is None and background is not None:
        record.extra["copy_seconds"] = round(copy_seconds, 4)  # what training waited for: the copy to CPU memory
        staged, in_flight = checkpoint, pending

        def write_and_commit() -> None:
            store.write(in_flight, lambda f: torch_save_without_zip_crc(staged, f))
            _commit(run, in_flight, record, protected, started, reason)

        # Its outcome comes later (journaled on commit or failure); the agreement below still runs on
        # every rank, as the other ranks cannot tell a background save from another.
        background.submit(write_and_commit, step)
    elif pending is not None and error is None:
        try:
            stored = _commit(run, pending, record, protected, started, reason)
        except Exception as exc:  # noqa: BLE001
            error = exc
    elif pending is not None and error is not None:
        store.abort(pending)

    if agreement.any(error is not None):
        what = "checkpoint" if reason in (REASON_PERIODIC, REASON_FINISHED) else "emergency checkpoint"
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"the {what} at step {step} failed: {error!r}; earlier checkpoints are intact") from error
        raise CheckpointError(f"the {what} at step {step} failed on another rank; earlier checkpoints are intact")
    if background is not None:
        return None
    # Ranks other than 0 learn the committed path (for messages and the journal) from rank 0's broadcast.
    if stored is not None:
        return stored
    return StoredCheckpoint(Path(final), CommitRecord(file=Path(final).name, step=step, bytes=0, checksum=""))


def _commit(run: RunDirectory, pending: PendingCheckpoint, record: CommitRecord, protect: set[Path], started: float,
            reason: str) -> StoredCheckpoint:
    stored = run.store.commit(pending, record)
    try:
        run.store.prune(protect=protect | {stored.path})
        commit_at = time.time()
        signal_at = record.extra.get("signal_at")
        copy = {"copy_seconds": record.extra["copy_seconds"]} if "copy_seconds" in record.extra else {}
        run.journal.append(Event.CHECKPOINT, path=str(stored.path), step=record.step, bytes=stored.record.bytes,
                           seconds=round(commit_at - started, 4), reason=reason, background=record.extra.get("background"),
                           signal_to_commit_seconds=round(commit_at - signal_at, 4) if signal_at else None, **copy)
    except OSError as exc:
        # The checkpoint is committed: a failed clean-up of older ones or journal line must not turn a good
        # save into a failed one (the run would then crash instead of being requeued).
        print(f"preemptible: checkpoint {stored.path.name} is committed, but pruning older checkpoints or "
              f"journaling it failed: {exc}", flush=True)
    return stored


def _say_if_short_of_space(run: RunDirectory, snapshot: Snapshot) -> None:
    import psutil

    need = estimated_checkpoint_bytes(run.store, snapshot.parameter_bytes())
    free = psutil.disk_usage(str(run.store.directory)).free
    if free < need:
        print(f"preemptible: warning: {free / 2**20:.0f} MiB free in {run.store.directory}, the checkpoint needs about "
              f"{need / 2**20:.0f} MiB; trying anyway", flush=True)


class DictSnapshot:
    """The :class:`Snapshot` of a hand-written loop: ``state()`` returns what to save (state_dicts, counters).

    The checkpoint is that dict plus, under :data:`~preemptible.core.schema.STATE_KEY`, every rank's
    own state (by default its RNG: python, numpy, torch, CUDA), which :func:`rank_state_in` gives
    back to the same rank on resume. Written with ``torch.save`` from rank 0 (load it with
    ``torch.load(path, weights_only=True)``).
    """

    streams = True

    def __init__(self, state: Callable[[], dict[str, Any]], rank_state: Optional[Callable[[], dict[str, Any]]] = None,
                 parameter_bytes: int = 0) -> None:
        from preemptible.core.rng import capture_rng

        self._state = state
        self._rank_state = rank_state or (lambda: {"rng": capture_rng()})
        self._parameter_bytes = parameter_bytes

    def rank_state(self) -> dict[str, Any]:
        return self._rank_state()

    def dump(self, rank_states: list[dict[str, Any]]) -> Any:
        return {**self._state(), STATE_KEY: {"format": STATE_FORMAT, "ranks": rank_states, "gathered": True}}

    def write(self, checkpoint: Any, path: str) -> None:
        raise NotImplementedError("a DictSnapshot is streamed by the store")

    def parameter_bytes(self) -> int:
        return self._parameter_bytes


def rank_state_in(checkpoint: dict[str, Any], rank: int) -> Optional[dict[str, Any]]:
    """This rank's own state in a checkpoint written through a :class:`DictSnapshot` (``None`` if absent)."""
    ranks = (checkpoint.get(STATE_KEY) or {}).get("ranks") or []
    return ranks[rank] if rank < len(ranks) else None
