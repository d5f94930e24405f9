"""Writing the emergency checkpoint through the trainer's own machinery, into the atomic store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import Strategy

from preemptible.agreement import DistributedStopAgreement, StopAgreement
from preemptible.rundir import RunDirectory
from preemptible.store import CheckpointError, CommitRecord, StoredCheckpoint


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


def gather_rank_states(agreement: StopAgreement, state: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    if world_size <= 1 or not isinstance(agreement, DistributedStopAgreement):
        return [state]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    agreement.close()
    dist.all_gather_object(out, state, group=agreement._group)
    return out


def save_emergency_checkpoint(
    trainer: "pl.Trainer",
    run: RunDirectory,
    agreement: StopAgreement,
    *,
    step: int,
    reason: str,
    rank_state: dict[str, Any],
    set_gathered: Callable[[Optional[list[dict[str, Any]]]], None],
    protect: set[Any],
    signal_at: float | None,
) -> StoredCheckpoint | None:
    """All ranks call this at the same step. Returns the committed checkpoint (on every rank)."""
    started = time.time()
    rank_state = dict(rank_state, signal_at=signal_at)
    if trainer.is_global_zero:
        import psutil

        need, free = estimated_checkpoint_bytes(run.store, trainer.lightning_module), psutil.disk_usage(str(run.store.directory)).free
        if free < need:
            print(f"preemptible: warning: {free / 2**20:.0f} MiB free in {run.store.directory}, the checkpoint needs about "
                  f"{need / 2**20:.0f} MiB; trying anyway", flush=True)
    states = gather_rank_states(agreement, rank_state, trainer.world_size)
    store = run.store
    pending = store.begin(step) if trainer.is_global_zero else None
    temp = trainer.strategy.broadcast(str(pending.temp_path) if pending else None)
    final = trainer.strategy.broadcast(str(pending.final_path) if pending else None)
    set_gathered(states)
    error: BaseException | None = None
    try:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if streams_with_torch_save(trainer.strategy):
            if pending is not None:
                store.write(pending, lambda f: torch.save(checkpoint, f))
        else:
            trainer.strategy.save_checkpoint(checkpoint, temp)
        del checkpoint
    except Exception as exc:  # noqa: BLE001 - every rank must learn of the failure, then it is re-raised
        error = exc
    finally:
        set_gathered(None)

    stored: StoredCheckpoint | None = None
    if pending is not None and error is None:
        signal_times = [s.get("signal_at") for s in states if s.get("signal_at")]
        first_signal = min(signal_times) if signal_times else None
        record = CommitRecord(
            file="", step=step, bytes=0, sha256="", epoch=trainer.current_epoch, reason=reason,
            world_size=trainer.world_size, job_id=run.env.job_id, restart_count=run.env.restart_count,
            extra={"signal_at": first_signal, "save_started_at": started},
        )
        try:
            stored = store.commit(pending, record)
            store.prune(protect={p for p in protect if p} | {stored.path})
        except Exception as exc:  # noqa: BLE001
            error = exc
    elif pending is not None:
        store.abort(pending)

    failed = agreement.now(1 if error is not None else 0)
    if failed:
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"the emergency checkpoint at step {step} failed: {error!r}; earlier checkpoints are intact") from error
        raise CheckpointError(f"the emergency checkpoint at step {step} failed on another rank; earlier checkpoints are intact")
    if stored is not None:
        commit_at = time.time()
        run.journal.append("checkpoint", path=str(stored.path), step=step, bytes=stored.record.bytes,
                           seconds=round(commit_at - started, 4), reason=reason,
                           signal_to_commit_seconds=round(commit_at - stored.record.extra["signal_at"], 4)
                           if stored.record.extra.get("signal_at") else None)
    # Ranks other than 0 learn the committed path (for messages and the journal) from rank 0's broadcast.
    return stored if stored is not None else StoredCheckpoint(Path(final), CommitRecord(file=Path(final).name, step=step, bytes=0, sha256=""))
