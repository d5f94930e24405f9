"""The session's configuration: one documented dataclass, validated in one place.

Every adapter (the Lightning callback, a plain loop) builds a :class:`SessionConfig` from its
arguments; a bad value is refused here, at construction, with a message that names the argument
and the values it accepts, before any process group or file exists.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from preemptible.core.environment import JobEnvironment
from preemptible.core.requeue import BACKENDS, RequeueBackend
from preemptible.core.signals import DEFAULT_SIGNALS, parse_signal
from preemptible.core.store import CHECKSUMS

#: Requeues a run may use unless ``max_requeues`` or ``$PREEMPTIBLE_MAX_REQUEUES`` says otherwise.
DEFAULT_MAX_REQUEUES = 50

SignalSpec = Union[str, int, signal.Signals]


@dataclass
class SessionConfig:
    """How a preemptible run behaves. Every field has the meaning of the ``PreemptionCallback`` argument of the same name.

    Attributes:
        run_dir: where the run lives across restarts (``None``: ``$PREEMPTIBLE_RUN_DIR``, else
            ``runs/$SLURM_JOB_ID`` under SLURM, else an error when the directory is first needed).
        signals: the signals that mean "stop soon", as names (``"USR1"``), numbers or ``signal.Signals``.
        requeue: ``"auto"``, ``"slurm"``, ``"submitit"``, ``"local"``, ``"none"`` or a ``RequeueBackend``.
        max_requeues: requeues the run may use (``None``: ``$PREEMPTIBLE_MAX_REQUEUES``, else 50).
        keep: committed checkpoints kept (at least 2; never the one resumed from).
        verify: ``"checksum"`` (size and checksum before resuming) or ``"size"``; ``"sha256"`` means ``"checksum"``.
        checksum: how new checkpoints are checksummed: ``"crc32"`` or ``"sha256"``.
        exact_data: resume map-style training loaders at the exact batch (adapters that own the loaders).
        save_on_finish: commit a last checkpoint when training ends.
        allow_world_size_change: resume a checkpoint written by a different number of ranks (inexact).
        every_n_steps, every_n_minutes: periodic safety checkpoints (``None``: off).
        async_save: write periodic checkpoints on a background thread from a CPU copy.
        deadline: ``True`` reads the job's end time from SLURM; a number is a fixed end time (unix
            seconds); ``False``/``None`` turns it off.
        agree_every_n_steps: under DDP, reduce the stop votes every N optimizer steps.

    Example::

        config = SessionConfig(run_dir="runs/exp1", signals=["USR1", "TERM"], every_n_minutes=30)
    """

    run_dir: Optional[Union[str, "os.PathLike[str]"]] = None
    signals: Iterable[SignalSpec] = DEFAULT_SIGNALS
    requeue: Union[str, RequeueBackend] = "auto"
    max_requeues: Optional[int] = None
    keep: int = 2
    verify: str = "checksum"
    checksum: str = "crc32"
    exact_data: bool = True
    save_on_finish: bool = True
    allow_world_size_change: bool = False
    every_n_steps: Optional[int] = None
    every_n_minutes: Optional[float] = None
    async_save: bool = True
    deadline: Union[bool, float, None] = True
    agree_every_n_steps: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, env: Optional[JobEnvironment] = None) -> None:
        """Check every field (and normalise a few); raise ``ValueError`` naming the argument and the fix."""
        if self.verify not in ("checksum", "sha256", "size"):
            raise ValueError(f"verify={self.verify!r}: use 'checksum' (size and checksum) or 'size'")
        if self.verify == "sha256":
            self.verify = "checksum"
        if self.checksum not in CHECKSUMS:
            raise ValueError(f"checksum={self.checksum!r}: use one of {sorted(CHECKSUMS)}")
        self.signals = tuple(dict.fromkeys(parse_signal(s) for s in self.signals))
        if not isinstance(self.requeue, RequeueBackend) and self.requeue not in BACKENDS:
            raise ValueError(f"requeue={self.requeue!r}: choose one of {', '.join(BACKENDS)} or pass a RequeueBackend")
        if self.max_requeues is None:
            from_env = (env or JobEnvironment.from_env()).max_requeues
            self.max_requeues = DEFAULT_MAX_REQUEUES if from_env is None else from_env
        if self.max_requeues < 0:
            raise ValueError(f"max_requeues={self.max_requeues} must be >= 0")
        if self.keep < 2:
            raise ValueError(f"keep={self.keep}: at least 2 checkpoints are always kept (a damaged newest one needs a fallback)")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"every_n_steps={self.every_n_steps} must be >= 1 (or None)")
        if self.every_n_minutes is not None and self.every_n_minutes <= 0:
            raise ValueError(f"every_n_minutes={self.every_n_minutes} must be > 0 (or None)")
        if self.agree_every_n_steps < 1:
            raise ValueError(f"agree_every_n_steps={self.agree_every_n_steps} must be >= 1")
        if not isinstance(self.deadline, (bool, int, float)) and self.deadline is not None:
            raise ValueError(f"deadline={self.deadline!r}: use True (read it from SLURM), False, or an end time in unix seconds")

    @property
    def requeue_limit(self) -> int:
        assert self.max_requeues is not None  # set by validate()
        return self.max_requeues

    def describe(self) -> dict[str, Any]:
        """The settings as plain values (signal names), for messages and records."""
        return {"signals": [parse_signal(s).name for s in self.signals], "requeue": getattr(self.requeue, "name", self.requeue),
                "max_requeues": self.max_requeues, "every_n_steps": self.every_n_steps,
                "every_n_minutes": self.every_n_minutes, "async_save": self.async_save}
