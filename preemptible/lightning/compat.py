"""Does a checkpoint fit this run? Checked before Lightning loads it, so the error names the file and the difference."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from preemptible.core.schema import COMMIT_SUFFIX, STATE_KEY, CommitRecordKey
from preemptible.core.store import CheckpointError

if TYPE_CHECKING:
    import pytorch_lightning as pl


class CheckpointMismatch(CheckpointError):
    """The checkpoint was written by a different model or a different number of ranks."""


def check_checkpoint_fits(path: str | os.PathLike[str], pl_module: "pl.LightningModule", world_size: int,
                          allow_world_size_change: bool, checkpoint: Optional[dict[str, Any]] = None) -> None:
    """Raise :class:`CheckpointMismatch` naming ``path`` and the difference, or return quietly.

    ``checkpoint``: the file already loaded (the dict Lightning then restores, so the file is not
    opened twice). Otherwise only its structure is read here (``mmap``), not its tensors' data.
    """
    path = Path(path)
    ckpt = checkpoint
    if ckpt is None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read is reported with the file name
            raise CheckpointMismatch(f"cannot read checkpoint {path}: {exc}") from exc
    saved: dict[str, Any] = ckpt.get("state_dict") or {}
    own = pl_module.state_dict()
    mismatched = [(k, tuple(saved[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)]
    shared = sum(k in saved for k in own)
    if mismatched or (own and saved and shared == 0):
        detail = "; ".join(f"{k}: checkpoint {a}, model {b}" for k, a, b in mismatched[:3])
        if len(mismatched) > 3:
            detail += f"; and {len(mismatched) - 3} more"
        if not mismatched:
            detail = f"no parameter names in common (checkpoint has e.g. {next(iter(saved))!r}, model {next(iter(own))!r})"
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit this model ({detail}). It was written by a different model: start "
            "the new model in a new run_dir (the old run's checkpoints are left untouched)."
        )
    written_by = _world_size_of(path, ckpt)
    if written_by is not None and written_by != world_size and not allow_world_size_change:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by a run of {written_by} rank(s); this run has {world_size}. The data order "
            "and every rank's random stream cannot continue exactly on a different number of ranks. Run with "
            f"{written_by} rank(s), or pass PreemptionCallback(allow_world_size_change=True) to resume anyway (inexactly)."
        )


def _world_size_of(path: Path, ckpt: dict[str, Any]) -> int | None:
    record = path.with_name(path.name + COMMIT_SUFFIX)
    try:
        return int(json.loads(record.read_text())[CommitRecordKey.WORLD_SIZE])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    state = (ckpt.get("callbacks") or {}).get(STATE_KEY) or {}
    ranks = state.get("ranks")
    return len(ranks) if isinstance(ranks, list) and state.get("gathered") else None
