"""Writing the emergency checkpoint through the trainer's own machinery, into the atomic store."""

from __future__ import annotations

import threading
from collections import OrderedDict
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import Strategy

from preemptible.core.agreement import DistributedStopAgreement, StopAgreement
from preemptible.core.rundir import RunDirectory
from preemptible.core.store import CheckpointError, CommitRecord, StoredCheckpoint


def streams_with_torch_save(strategy: Strategy) -> bool:
    """Whether the strategy would write one file with plain ``torch.save`` from rank 0.

    Then we write it ourselves, streaming into the temp file while hashing, instead of Lightning's
    ``TorchCheckpointIO`` which first serializes the whole checkpoint into memory. Any other
    strategy (sharded, DeepSpeed, a custom ``CheckpointIO``) saves through its own method.
    """
    return type(strategy.checkpoint_io) is TorchCheckpointIO and type(strategy).save_checkpoint is Strategy.save_checkpoint


def estimated_checkpoint_bytes(store: Any, pl_module: Any) -> int:
    """The last committed checkpoint's size, else three times the parameters (weights + two optimizer moments)."""
    committed = store.committed()
    if committed and committed[-1].record.bytes > 0:
        return int(committed[-1].record.bytes)
    return 3 * sum(p.numel() * p.element_size() for p in pl_module.parameters())


def warn_if_short_of_space(store: Any, pl_module: Any) -> None:
    """Say at start, not at the emergency, when the checkpoint directory cannot hold two more checkpoints."""
    import warnings

    import psutil

    need = estimated_checkpoint_bytes(store, pl_module)
    store.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    free = psutil.disk_usage(str(store.directory)).free
    if free < 2 * need:
        warnings.warn(
            f"preemptible: {store.directory} has {free / 2**20:.0f} MiB free, and a checkpoint of this run takes about "
            f"{need / 2**20:.0f} MiB (a save needs room for the new one next to the previous): an emergency save may "
            "fail with a full disk. Free space or point run_dir at a larger filesystem.", stacklevel=3)


def torch_save_without_zip_crc(obj: Any, f: Any) -> None:
    """``torch.save`` without the zip container's per-record CRC-32.

    ``torch.load`` never checks those CRCs, while the store checksums every byte of the file and
    checks it before a resume; computing both would add about 30 % to a save that is CPU-bound.
    The switch is torch's public serialization config (torch >= 2.6), read when the zip writer is
    created; older torch versions simply keep their CRCs.
    """
    try:
        from torch.utils.serialization import config
    except ImportError:
        config = None
    if config is None or not hasattr(config.save, "compute_crc32"):
        torch.save(obj, f)
        return
    with config.patch({"save.compute_crc32": False}):
        torch.save(obj, f)


def gather_rank_states(agreement: StopAgreement, state: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    if world_size <= 1 or not isinstance(agreement, DistributedStopAgreement):
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    # The stop vote issued at this boundary stays in flight (every rank issued it before this gather, so
    # the group runs them in the same order everywhere) and is read at the next boundary as usual.
    dist.all_gather_object(out, state, group=agreement._group)
    return out


class BackgroundWriter:
    """At most one checkpoint write in flight on a daemon thread (rank 0 of a periodic, asynchronous save).

    It also keeps the CPU copy of the state between saves (:meth:`stage`): copying into memory that
    was already allocated and touched is about twice as fast as allocating it anew (each new page
    is faulted in on first write), and the copy is what training waits for.
    """

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._staging: dict[tuple[Any, ...], torch.Tensor] = {}
        self.last_error: Optional[BaseException] = None

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

    def submit(self, work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - reported by the next save, never lost silently
                self.last_error = exc
                print(f"preemptible: background checkpoint failed: {exc}; the previous checkpoints are intact", flush=True)

        self._thread = threading.Thread(target=run, name="preemptible-checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Let a write in flight finish (an emergency save must not race it for the same directory)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


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


def save_checkpoint(
    trainer: "pl.Trainer",
    run: RunDirectory,
    agreement: StopAgreement,
    *,
    step: int,
    reason: str,
    rank_state: dict[str, Any],
    set_gathered: Callable[[Optional[list[dict[str, Any]]]], None],
    protect: set[Any],
    signal_at: float | None = None,
    background: Optional[BackgroundWriter] = None,
) -> StoredCheckpoint | None:
    """All ranks call this at the same step; returns the committed checkpoint (rank 0's record; the path elsewhere).

    With ``background`` (periodic saves), rank 0 copies the state to CPU memory and writes it on a
    thread while training goes on; ``None`` is returned and the commit is journaled when it lands.
    Strategies that write through their own ``save_checkpoint`` are always saved synchronously.
    """
    started = time.time()
    rank_state = dict(rank_state, signal_at=signal_at)
    streaming = streams_with_torch_save(trainer.strategy)
    if background is not None and not streaming:
        background = None
    if trainer.is_global_zero:
        _say_if_short_of_space(run, trainer)
    states = gather_rank_states(agreement, rank_state, trainer.world_size)
    store = run.store
    pending = store.begin(step) if trainer.is_global_zero else None
    temp = trainer.strategy.broadcast(str(pending.temp_path) if pending else None)
    final = trainer.strategy.broadcast(str(pending.final_path) if pending else None)
    set_gathered(states)
    error: BaseException | None = None
    checkpoint: Any = None
    copy_seconds = 0.0
    try:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if background is not None:
            copy_started = time.time()
            checkpoint = background.stage(checkpoint) if pending is not None else None
            copy_seconds = time.time() - copy_started
        elif streaming:
            if pending is not None:
                store.write(pending, lambda f: torch_save_without_zip_crc(checkpoint, f))
            checkpoint = None
        else:
            trainer.strategy.save_checkpoint(checkpoint, temp)
            checkpoint = None
    except Exception as exc:  # noqa: BLE001 - every rank must learn of the failure, then it is re-raised
        error = exc
    finally:
        set_gathered(None)

    signal_times = [s.get("signal_at") for s in states if s.get("signal_at")]
    record = CommitRecord(
        file="", step=step, bytes=0, checksum="", epoch=trainer.current_epoch, reason=reason,
        world_size=trainer.world_size, job_id=run.env.job_id, restart_count=run.env.restart_count,
        extra={"signal_at": min(signal_times) if signal_times else None, "save_started_at": started,
               "background": background is not None},
    )
    protected = {p for p in protect if p}
    stored: StoredCheckpoint | None = None
    if pending is not None and error is None and background is not None:
        record.extra["copy_seconds"] = round(copy_seconds, 4)  # what training waited for: the copy to CPU memory
        state = checkpoint

        def write_and_commit() -> None:
            store.write(pending, lambda f: torch_save_without_zip_crc(state, f))
            _commit(run, pending, record, protected, started, reason)

        # Its outcome comes later (journaled on commit, reported by the thread on failure); the agreement
        # below still runs on every rank, as the other ranks cannot tell a background save from another.
        background.submit(write_and_commit)
    elif pending is not None and error is None:
        try:
            stored = _commit(run, pending, record, protected, started, reason)
        except Exception as exc:  # noqa: BLE001
            error = exc
    elif pending is not None and error is not None:
        store.abort(pending)

    failed = agreement.any(error is not None)
    if failed:
        what = "checkpoint" if reason in ("periodic", "finished") else "emergency checkpoint"
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"the {what} at step {step} failed: {error!r}; earlier checkpoints are intact") from error
        raise CheckpointError(f"the {what} at step {step} failed on another rank; earlier checkpoints are intact")
    if background is not None:
        return None
    # Ranks other than 0 learn the committed path (for messages and the journal) from rank 0's broadcast.
    return stored if stored is not None else StoredCheckpoint(Path(final), CommitRecord(file=Path(final).name, step=step, bytes=0, checksum=""))


def _commit(run: RunDirectory, pending: Any, record: CommitRecord, protect: set[Any], started: float, reason: str) -> StoredCheckpoint:
    stored = run.store.commit(pending, record)
    run.store.prune(protect=protect | {stored.path})
    commit_at = time.time()
    signal_at = record.extra.get("signal_at")
    copy = {"copy_seconds": record.extra["copy_seconds"]} if "copy_seconds" in record.extra else {}
    run.journal.append("checkpoint", path=str(stored.path), step=record.step, bytes=stored.record.bytes,
                       seconds=round(commit_at - started, 4), reason=reason, background=record.extra.get("background"),
                       signal_to_commit_seconds=round(commit_at - signal_at, 4) if signal_at else None, **copy)
    return stored


def _say_if_short_of_space(run: RunDirectory, trainer: "pl.Trainer") -> None:
    import psutil

    need = estimated_checkpoint_bytes(run.store, trainer.lightning_module)
    free = psutil.disk_usage(str(run.store.directory)).free
    if free < need:
        print(f"preemptible: warning: {free / 2**20:.0f} MiB free in {run.store.directory}, the checkpoint needs about "
              f"{need / 2**20:.0f} MiB; trying anyway", flush=True)
