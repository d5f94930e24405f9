"""How a Lightning trainer's state reaches the session's two-phase save: the :class:`LightningSnapshot`."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

from preemptible.core.checkpointing import estimated_checkpoint_bytes
from preemptible.core.schema import STATE_FORMAT, STATE_KEY
from preemptible.core.store import CheckpointStore
from preemptible.lightning import hooks, namespace

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import Strategy


def streams_with_torch_save(strategy: Strategy) -> bool:
    """Whether the strategy would write one file with plain ``torch.save`` from rank 0.

    Then the store writes it itself, streaming into the temp file while checksumming, instead of
    Lightning's ``TorchCheckpointIO`` which first serializes the whole checkpoint into memory. Any
    other strategy (sharded, DeepSpeed, a custom ``CheckpointIO``) saves through its own method.
    The classes are those of the strategy's own package (``lightning.pytorch`` or ``pytorch_lightning``).
    """
    package = namespace.of(strategy)
    torch_io, base = package.load("plugins.io", "TorchCheckpointIO"), package.load("strategies", "Strategy")
    return type(strategy.checkpoint_io) is torch_io and type(strategy).save_checkpoint is base.save_checkpoint


def parameter_bytes(pl_module: "pl.LightningModule") -> int:
    return sum(p.numel() * p.element_size() for p in pl_module.parameters())


def packed_state(rank_states: list[dict[str, Any]], gathered: bool) -> dict[str, Any]:
    """preemptible's entry in ``checkpoint["callbacks"]``: every rank's own state, in rank order."""
    return {"format": STATE_FORMAT, "ranks": rank_states, "gathered": gathered}


class LightningSnapshot:
    """The :class:`~preemptible.core.checkpointing.Snapshot` of a Lightning trainer.

    ``dump`` is Lightning's own checkpoint dict (what ``trainer.save_checkpoint`` writes), in which
    preemptible's entry, filled by ``callback.state_dict()`` with this rank's state only, is replaced
    by the state of every rank that the session gathered.
    """

    def __init__(self, trainer: "pl.Trainer", rank_state: Callable[[], dict[str, Any]]) -> None:
        self.trainer = trainer
        self._rank_state = rank_state
        self.streams = streams_with_torch_save(trainer.strategy)

    def rank_state(self) -> dict[str, Any]:
        return self._rank_state()

    def dump(self, rank_states: list[dict[str, Any]]) -> Any:
        checkpoint = hooks.dump_checkpoint(self.trainer)
        checkpoint.setdefault("callbacks", {})[STATE_KEY] = packed_state(rank_states, gathered=True)
        return checkpoint

    def write(self, checkpoint: Any, path: str) -> None:
        self.trainer.strategy.save_checkpoint(checkpoint, path)

    def parameter_bytes(self) -> int:
        return parameter_bytes(self.trainer.lightning_module)


class ValidationStartSnapshot:
    """The :class:`~preemptible.core.checkpointing.Snapshot` of a stop inside a validation: the state from its start.

    A validation changes neither weights nor optimizer, so the checkpoint is dumped live at the stop
    and only what validation moves is taken from its start: the fit loop's progress (marked as owing
    the validation, see :func:`preemptible.lightning.hooks.fit_loop_state_owing_validation`) and this
    rank's own state (RNG and data position, captured after the training batch that the validation
    follows, before its loader drew anything).
    """

    def __init__(self, live: LightningSnapshot, fit_loop_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        self.live = live
        self.streams = live.streams
        self._fit_loop_state = fit_loop_state
        self._rank_state = rank_state

    def rank_state(self) -> dict[str, Any]:
        return self._rank_state

    def dump(self, rank_states: list[dict[str, Any]]) -> Any:
        checkpoint = self.live.dump(rank_states)
        checkpoint.setdefault("loops", {})["fit_loop"] = self._fit_loop_state
        return checkpoint

    def write(self, checkpoint: Any, path: str) -> None:
        self.live.write(checkpoint, path)

    def parameter_bytes(self) -> int:
        return self.live.parameter_bytes()


def warn_if_short_of_space(store: CheckpointStore, pl_module: "pl.LightningModule") -> None:
    """Say at start, not at the emergency, when the checkpoint directory cannot hold two more checkpoints."""
    import psutil

    need = estimated_checkpoint_bytes(store, parameter_bytes(pl_module))
    store.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    free = psutil.disk_usage(str(store.directory)).free
    if free < 2 * need:
        warnings.warn(
            f"preemptible: {store.directory} has {free / 2**20:.0f} MiB free, and a checkpoint of this run takes about "
            f"{need / 2**20:.0f} MiB (a save needs room for the new one next to the previous): an emergency save may "
            "fail with a full disk. Free space or point run_dir at a larger filesystem.", stacklevel=3)
