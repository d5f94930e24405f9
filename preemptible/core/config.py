"""The session's configuration: one documented dataclass, validated in one place.

Every adapter (the Lightning callback, a plain loop) builds a :class:`SessionConfig` from its
arguments; a bad value is refused here, at construction, with a message that names the argument
and the values it accepts, before any process group or file exists.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Iterable, Optional, Union

from preemptible.core.crashes import DEFAULT_MAX_CRASH_REQUEUES
from preemptible.core.environment import JobEnvironment
from preemptible.core.requeue import BACKENDS, RequeueBackend
from preemptible.core.signals import DEFAULT_SIGNALS, parse_signal
from preemptible.core.store import CHECKSUMS
from preemptible.core.watchdog import DEFAULT_PEER_TIMEOUT

#: Requeues a run may use unless ``max_requeues`` or ``$PREEMPTIBLE_MAX_REQUEUES`` says otherwise.
DEFAULT_MAX_REQUEUES = 50

SignalSpec = Union[str, int, signal.Signals]


@dataclass
class SessionConfig:
    """How a preemptible run behaves. Every field has the meaning of the ``PreemptionCallback`` argument of the same name.

    Attributes:
        run_dir: the run's directory, identical for every restart. Default: ``$PREEMPTIBLE_RUN_DIR``,
            else ``runs/<SLURM_JOB_ID>`` under SLURM, else an error when the directory is first needed.
        signals: signals that mean "stop soon": names (``"USR1"``, ``"SIGTERM"``), numbers or ``signal.Signals``.
        requeue: ``"auto"`` (SLURM → ``scontrol requeue``; submitit → submitit; else the exit code only),
            ``"slurm"``, ``"submitit"``, ``"local"``, ``"none"``, or a :class:`~preemptible.core.requeue.RequeueBackend`.
        max_requeues: how many requeues the run may use (counted from ``SLURM_RESTART_COUNT`` and the
            run's own record). Past it the checkpoint is still written, and the process exits with code 1
            and a message saying so. Default: ``$PREEMPTIBLE_MAX_REQUEUES``, else 50.
        max_crash_requeues: how many times a run that *crashed* (a rank killed by a signal or the OOM killer,
            a lost node; not an exception of the training code) is requeued by its supervisor (the sbatch
            templates' batch shell, ``preemptible run``, the submitit task), counted apart from ``max_requeues``.
            A second crash in a row without a new checkpoint stops the run earlier (see :mod:`preemptible.core.crashes`).
            Default: ``$PREEMPTIBLE_MAX_CRASH_REQUEUES``, else 3.
        keep: committed checkpoints to keep (at least 2; never the one the run resumed from).
        verify: ``"checksum"`` (default) checks size and checksum of a checkpoint before resuming from it,
            ``"size"`` only its size (``"sha256"``, the name of 0.1.0, means ``"checksum"``).
        checksum: how new checkpoints are checksummed: ``"crc32"`` (default; detects accidental
            damage, 2-3x faster than sha256 to write and to check) or ``"sha256"``.
        exact_data: make map-style training ``DataLoader`` s resume mid-epoch at the exact batch with
            the same shuffle and augmentation randomness (adapters that own the loaders; README "What is exact").
        save_on_finish: commit a last checkpoint when training ends, so that a finished run that is
            started again (a late requeue, an operator's resubmission) resumes at its end instead of redoing work.
        allow_world_size_change: resume a checkpoint written by a different number of ranks (the
            continuation is then not exact); by default that is an error naming both numbers.
        every_n_steps, every_n_minutes: periodic safety checkpoints (against crashes and SIGKILL without
            warning) through the same atomic store and retention. The time-based one follows rank 0's
            clock. Under DDP a save lands one or two steps after it is due (the ranks agree on it as on a
            stop), and one still being written in the background skips the next.
        async_save: write periodic checkpoints on a background thread from a CPU copy of the state,
            so training waits only for the copy, not for the disk. The copy's buffers are kept and
            reused from one save to the next: one checkpoint's worth of CPU memory.
        deadline: ``True`` reads the job's end time from SLURM (``squeue``) and checkpoints and requeues
            proactively when the time left would no longer fit an emergency save; a number is a fixed
            end time (unix seconds); ``False`` turns it off.
        agree_every_n_steps: under DDP, reduce the ranks' stop votes only every N optimizer steps.
            Under Lightning, while SIGTERM is among ``signals``, the reduction runs in the slot of
            Lightning's own per-batch SIGTERM broadcast, which it replaces, so it adds no collective;
            raising N removes even that one from most batches (the stop then comes up to 2 N steps
            after the signal instead of 1-2), which shows only on steps of a few milliseconds.
        peer_timeout: under DDP, seconds without a heartbeat from a peer rank (dead without warning,
            or frozen) after which every rank leaves with exit code 145 (``CRASH_EXIT_CODE``) instead of
            waiting out the collective timeout; each rank is gone within ``4/3 * peer_timeout``, and a SLURM
            step held by a rank frozen on another node is ended within ``11/6 * peer_timeout``
            (:mod:`preemptible.core.watchdog`). Default: ``$PREEMPTIBLE_PEER_TIMEOUT``, else 60; 0 turns it off.

    Example::

        config = SessionConfig(run_dir="runs/exp1", signals=["USR1", "TERM"], every_n_minutes=30)
    """

    run_dir: Optional[Union[str, "os.PathLike[str]"]] = None
    signals: Iterable[SignalSpec] = DEFAULT_SIGNALS
    requeue: Union[str, RequeueBackend] = "auto"
    max_requeues: Optional[int] = None
    max_crash_requeues: Optional[int] = None
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
    peer_timeout: Optional[float] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
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
            from_env = JobEnvironment.from_env().max_requeues
            if from_env is None:
                self.max_requeues = DEFAULT_MAX_REQUEUES
            else:
                try:
                    self.max_requeues = int(from_env)
                except ValueError:
                    raise ValueError(f"PREEMPTIBLE_MAX_REQUEUES={from_env!r} is not a whole number; set it to e.g. 50, "
                                     "unset it, or pass max_requeues=") from None
        if self.max_crash_requeues is None:
            from_env = JobEnvironment.from_env().max_crash_requeues
            if from_env is None:
                self.max_crash_requeues = DEFAULT_MAX_CRASH_REQUEUES
            else:
                try:
                    self.max_crash_requeues = int(from_env)
                except ValueError:
                    raise ValueError(f"PREEMPTIBLE_MAX_CRASH_REQUEUES={from_env!r} is not a whole number; set it to e.g. "
                                     "3, unset it, or pass max_crash_requeues=") from None
        if self.max_crash_requeues < 0:
            raise ValueError(f"max_crash_requeues={self.max_crash_requeues} must be >= 0")
        if self.max_requeues < 0:
            raise ValueError(f"max_requeues={self.max_requeues} must be >= 0")
        if self.keep < 2:
            raise ValueError(f"keep={self.keep}: at least 2 checkpoints are always kept (a damaged newest one needs a fallback)")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"every_n_steps={self.every_n_steps} must be >= 1 (or None)")
        if self.every_n_minutes is not None and self.every_n_minutes <= 0:
            raise ValueError(f"every_n_minutes={self.every_n_minutes} must be > 0 (or None)")
        if self.peer_timeout is None:
            from_env = JobEnvironment.from_env().peer_timeout
            try:
                self.peer_timeout = DEFAULT_PEER_TIMEOUT if from_env is None else float(from_env)
            except ValueError:
                raise ValueError(f"PREEMPTIBLE_PEER_TIMEOUT={from_env!r} is not a number of seconds; set it to e.g. 60, "
                                 "0 to turn the peer watchdog off, or unset it") from None
        if self.peer_timeout < 0:
            raise ValueError(f"peer_timeout={self.peer_timeout} must be >= 0 seconds (0 turns the peer watchdog off)")
        if self.agree_every_n_steps < 1:
            raise ValueError(f"agree_every_n_steps={self.agree_every_n_steps} must be >= 1")
        if not isinstance(self.deadline, (bool, int, float)) and self.deadline is not None:
            raise ValueError(f"deadline={self.deadline!r}: use True (read it from SLURM), False, or an end time in unix seconds")

    @property
    def requeue_limit(self) -> int:
        assert self.max_requeues is not None  # set by validate()
        return self.max_requeues
