"""Attach-and-forget resume: which checkpoint a ``trainer.fit`` restores, and what the user's own choice overrides.

``trainer.fit(model, datamodule)`` with the callback attached and no ``ckpt_path`` continues from the
run's newest valid checkpoint, so that a LightningCLI or Hydra config (which has no way to call
``resume_path()``) resumes like a script. An explicit ``ckpt_path`` (the argument, ``trainer.ckpt_path``,
``--ckpt_path``, or a checkpoint Lightning chose itself, e.g. its SLURM ``"hpc"`` one) is what gets
loaded; when the run directory holds a newer committed checkpoint, a warning says so.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from preemptible.core.session import PreemptionSession

if TYPE_CHECKING:
    import pytorch_lightning as pl


def newest_checkpoint(trainer: "pl.Trainer", session: PreemptionSession, already_asked: bool) -> Optional[str]:
    """Every rank at set-up: the run's newest valid checkpoint, as global rank 0 found it.

    ``already_asked``: the script called ``resume_path()`` itself (its answer is reused, not recomputed:
    checking a large checkpoint's checksum takes a while).
    """
    found = str(session.resumed_from) if already_asked and session.resumed_from else None
    if not already_asked:
        found = session.resume_path()
    # Rank 0 moves damaged checkpoints aside while the others look: its answer is the one every rank loads.
    chosen: Optional[str] = trainer.strategy.broadcast(found)
    session.resumed_from = Path(chosen) if chosen else None
    return chosen


def choose_checkpoint(asked: Optional[str | os.PathLike[str]], newest: Optional[str], is_global_zero: bool) -> Optional[str]:
    """The checkpoint to restore: ``asked`` (the user's or Lightning's own choice) when given, else ``newest``."""
    if asked is None or asked == "":
        return newest
    asked = str(asked)
    if newest is not None and is_global_zero and _is_newer(newest, asked):
        warnings.warn(
            f"preemptible: resuming from the ckpt_path you passed ({asked}), but this run's directory holds a newer "
            f"committed checkpoint ({newest}). Leave ckpt_path out (or pass ckpt_path=callback.resume_path()) to "
            "continue where the run was preempted.", stacklevel=2)
    return asked


def _is_newer(newest: str, asked: str) -> bool:
    try:
        if os.path.samefile(newest, asked):
            return False
        return os.stat(newest).st_mtime > os.stat(asked).st_mtime
    except OSError:  # not a local file (a URL, a directory of a sharded checkpoint that moved): say nothing
        return False
