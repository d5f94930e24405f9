"""preemptible: PyTorch Lightning training that survives cluster preemption.

The canonical use::

    from preemptible import PreemptionCallback

    trainer = pl.Trainer(max_epochs=3, callbacks=[PreemptionCallback(run_dir="runs/exp1")])
    trainer.fit(model, datamodule=dm)  # starts, or resumes the run where it was preempted

``pl`` is ``lightning.pytorch`` or ``pytorch_lightning``: ``PreemptionCallback`` is a subclass of the
``Callback`` of the one the process imported (see :mod:`preemptible.lightning.namespace`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from preemptible.core.exit import CANCELLED_EXIT_CODE, REQUEUE_EXIT_CODE, Cancelled, Preempted, RequeueLimitReached
from preemptible.core.store import CheckpointError, InvalidCheckpoint

if TYPE_CHECKING:
    from preemptible.core.config import SessionConfig
    from preemptible.core.session import PreemptionSession
    from preemptible.lightning.callback import PreemptionCallback

__version__ = "0.1.0"

__all__ = [
    "PreemptionCallback",
    "PreemptionSession",
    "SessionConfig",
    "Preempted",
    "RequeueLimitReached",
    "REQUEUE_EXIT_CODE",
    "Cancelled",
    "CANCELLED_EXIT_CODE",
    "CheckpointError",
    "InvalidCheckpoint",
    "latest_checkpoint",
]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest committed, valid checkpoint under ``run_dir/checkpoints``, or ``None``.

    Read-only: invalid checkpoints are reported with a warning and skipped, not moved.
    """
    from preemptible.core.store import CheckpointStore

    found = CheckpointStore(Path(run_dir) / "checkpoints").latest_valid(quarantine=False)
    return found.path if found else None


def __getattr__(name: str) -> Any:
    # Lightning takes seconds to import: load it only when the callback is asked for, so the CLI's
    # `status`, `run` supervisor and the store stay fast.
    # Looked up at every access, not cached: the class depends on which Lightning the process has imported.
    if name == "PreemptionCallback":
        from preemptible.lightning.namespace import callback_class

        return callback_class()
    if name == "PreemptionSession":  # the trainer-neutral core (imports torch, not Lightning)
        from preemptible.core.session import PreemptionSession

        return PreemptionSession
    if name == "SessionConfig":
        from preemptible.core.config import SessionConfig

        return SessionConfig
    raise AttributeError(f"module 'preemptible' has no attribute {name!r}")
