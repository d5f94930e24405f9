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
