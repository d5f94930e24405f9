"""Lightning callbacks for checking exactness: record every step, or send a real signal at an exact step.

:class:`StepRecorder` appends one JSON line per training (and validation) batch with the loss as
an exact float hex string, and at the end the sha256 of every rank's state_dict. Two records are
bitwise equal exactly when the runs were. :class:`SignalAtStep` makes a process send itself a real
signal (``os.kill``) at a chosen point, so a test can preempt on an exact batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from preemptible.core.environment import JobEnvironment
from preemptible.core.schema import TraceKind, trace_entry
from preemptible.lightning import pltypes
from preemptible.lightning.namespace import package_in_use

# The callbacks of the Lightning the process imported (``lightning.pytorch`` or ``pytorch_lightning``): a Trainer
# accepts only its own package's classes. No ``if TYPE_CHECKING`` import here: see preemptible.lightning.pltypes.
pl: Any = package_in_use().load_module()


def state_digest(module: nn.Module) -> str:
    """sha256 over ``module.state_dict()`` in key order: equal digests mean bitwise-equal weights and buffers."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(_tensor_bytes(value))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _loss_of(outputs: Any) -> Optional[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


class StepRecorder(pl.Callback):
    """Append one :func:`~preemptible.core.schema.trace_entry` per batch to ``path`` (fields: ``TRACE_FIELDS``).

    Args:
        path: the JSON-lines file (all ranks append to it; each line is written whole).
        params: also record a digest of the weights after every optimizer step (slower; used by
            ``preemptible check`` to find the first step at which two runs part).
        final_state: also save the final ``state_dict`` of each rank next to ``path`` (``.rankN.pt``),
            so that the first differing tensor can be named.
    """

    def __init__(self, path: str | os.PathLike[str], params: bool = False, final_state: bool = False) -> None:
        self.path = Path(path)
        self.params = params
        self.final_state = final_state
        self.attempt = JobEnvironment.from_env().restart_count  # this process's attempt: read once

    def _write(self, trainer: "pltypes.Trainer", kind: str, batch_idx: Optional[int] = None, **fields: Any) -> None:
        entry = trace_entry(kind, trainer.global_rank, trainer.current_epoch, batch_idx, trainer.global_step,
                            self.attempt, **fields)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def on_train_batch_end(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs)
        fields: dict[str, Any] = {"loss": float(loss.detach()).hex() if loss is not None else None}
        if self.params:
            fields["weights"] = state_digest(pl_module)
        # global_step has already moved past this batch's optimizer step: record the step it trained at.
        self._write(trainer, TraceKind.TRAIN, batch_idx, **fields)

    def on_validation_batch_end(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule", outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = _loss_of(outputs)
        if not trainer.sanity_checking and loss is not None:
            self._write(trainer, TraceKind.VAL, batch_idx, loss=float(loss.detach()).hex())

    def on_validation_end(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule") -> None:
        # What the validation logged (its epoch-level aggregates), as the loggers receive it.
        if not trainer.sanity_checking:
            metrics = {k: float(v).hex() for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val")}
            self._write(trainer, TraceKind.VAL_METRICS, metrics=metrics)

    def on_fit_end(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule") -> None:
        self._write(trainer, TraceKind.FINAL, weights=state_digest(pl_module))
        if self.final_state:
            torch.save(pl_module.state_dict(), self.path.with_suffix(f".rank{trainer.global_rank}.pt"))


class SignalAtStep(pl.Callback):
    """Send a real signal to this process at an exact point of attempt number ``k`` (``at[k]``).

    Points: ``"0"`` — when fit starts, before the first batch; ``"N"`` — right after the batch
    that completed optimizer step N; ``"N+"`` — after the
    next batch (inside a gradient-accumulation window when accumulating); ``"vN"`` — at the first
    validation batch while the global step is N; ``"vN:K"`` — at the start of validation batch K
    then; ``"vN:end"`` — in ``on_validation_epoch_end`` then; ``"sanity"`` — at the first batch of
    the sanity check; ``"load"`` — while the trainer restores a checkpoint (``on_load_checkpoint``);
    ``"eN"`` — when epoch N starts, before its loader (and its workers) starts; ``"eN:end"`` — in
    ``on_train_epoch_end`` of epoch N.

    Args:
        at: one point per attempt (``PREEMPTIBLE_ATTEMPT``/``SLURM_RESTART_COUNT`` picks it); attempts
            past the list are left alone.
        signum: the signal to send.
        ranks: the global ranks that signal themselves (default all).
    """

    def __init__(self, at: Sequence[str], signum: int | signal.Signals = signal.SIGUSR1,
                 ranks: Optional[Sequence[int]] = None) -> None:
        attempt = JobEnvironment.from_env().restart_count
        self.point = at[attempt] if attempt < len(at) else None
        self.signum = signum
        self.ranks = set(ranks) if ranks is not None else None
        self._fired = False
        self._armed_after_step = False

    def _fire(self, trainer: "pltypes.Trainer") -> None:
        if not self._fired and (self.ranks is None or trainer.global_rank in self.ranks):
            self._fired = True
            os.kill(os.getpid(), self.signum)

    def on_fit_start(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule") -> None:
        if self.point == "0":
            self._fire(trainer)

    def on_load_checkpoint(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        if self.point == "load":
            self._fire(trainer)

    def on_train_epoch_start(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule") -> None:
        if self.point == f"e{trainer.current_epoch}":
            self._fire(trainer)

    def on_train_epoch_end(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule") -> None:
        if self.point == f"e{trainer.current_epoch}:end":
            self._fire(trainer)

    def on_validation_epoch_end(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule") -> None:
        if self.point == f"v{trainer.global_step}:end" and not trainer.sanity_checking:
            self._fire(trainer)

    def on_train_batch_end(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.point is None or not self.point.rstrip("+").isdigit() or self.point == "0":
            return
        step = int(self.point.rstrip("+"))
        if self._armed_after_step:
            self._fire(trainer)
        elif trainer.global_step == step:
            if self.point.endswith("+"):
                self._armed_after_step = True
            else:
                self._fire(trainer)

    def on_validation_batch_start(self, trainer: "pltypes.Trainer", pl_module: "pltypes.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.point == "sanity" and trainer.sanity_checking and batch_idx == 0:
            self._fire(trainer)
        elif self.point and self.point.startswith("v") and not trainer.sanity_checking:
            step, _, at = self.point[1:].partition(":")
            if trainer.global_step == int(step) and (at == "" and batch_idx == 0 or at == str(batch_idx)):
                self._fire(trainer)


def preemption_signal_recorded() -> bool:
    """Testing: whether this process's recording handler (``SignalRecorder``) has noted a signal.

    The handler in place for SIGUSR1 is a bound method of the recorder, whose ``note`` is ``None``
    until a signal came; a process without one is a test set up wrongly, hence the error.
    """
    handler = signal.getsignal(signal.SIGUSR1)
    recorder = getattr(handler, "__self__", None)
    if recorder is None or not hasattr(recorder, "note"):
        raise RuntimeError(f"no recording signal handler is installed (found {handler!r})")
    return recorder.note is not None


def hold_until(done: Callable[[], bool], timeout: float) -> bool:
    """Testing: pause until ``done()`` or ``timeout`` seconds; returns whether it came true.

    It only sleeps (nothing trained, no random number drawn), and a signal's handler runs during
    the sleep, so a test can hold a run at a state and send its signal there.
    """
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True

