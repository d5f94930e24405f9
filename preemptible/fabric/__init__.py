"""Lightning Fabric loops that survive preemption: :class:`FabricLoop`.

Works with ``lightning.fabric.Fabric`` and the standalone ``lightning_fabric.Fabric`` alike. The
loop is :class:`preemptible.loop.PreemptibleLoop` with Fabric's own ways in: ranks from the
``Fabric`` object, the checkpoint loaded with ``fabric.load(path, state)`` (and readable by it
outside preemptible), sharded strategies saved with ``fabric.save`` on every rank, and the ranks
Fabric launched itself (``devices=N`` without an outside launcher) awaited before the parent exits.

Example::

    fabric = L.Fabric(accelerator="cpu", strategy="ddp", devices=2)
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    with FabricLoop(fabric, state, run_dir="runs/exp1") as loop:   # resumes into state
        loader = loop.dataloader(loader)
        while loop.step < max_steps:
            for batch in loader:
                ...
                optimizer.step()
                loop.after_step()          # may checkpoint and raise Preempted (exit code 144)
                if loop.step == max_steps:
                    break
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from preemptible.core.config import SessionConfig
from preemptible.core.environment import JobEnvironment
from preemptible.core.schema import STATE_KEY
from preemptible.fabric import hooks
from preemptible.loop.loop import LoopSnapshot, PreemptibleLoop

__all__ = ["FabricLoop"]

#: Seconds the parent rank waits for the ranks Fabric launched to exit after a stop.
CHILD_EXIT_TIMEOUT = 120.0


def _fabric_package(fabric: Any) -> str:
    """``lightning.fabric`` or ``lightning_fabric``: the package the given ``Fabric`` comes from."""
    module = type(fabric).__module__
    if module.startswith("lightning.fabric"):
        return "lightning.fabric"
    if module.startswith("lightning_fabric"):
        return "lightning_fabric"
    raise TypeError(f"FabricLoop: expected a lightning.fabric.Fabric (or lightning_fabric.Fabric), got {type(fabric)!r}")


def streams_with_torch_save(fabric: Any) -> bool:
    """Whether ``fabric.save`` would write one file with plain ``torch.save`` from rank 0 (single device, DDP).

    Then the store streams it itself (and can write periodic checkpoints in the background); a sharded
    strategy (FSDP, DeepSpeed, model parallel) or a custom ``CheckpointIO`` saves through ``fabric.save``.
    """
    package = _fabric_package(fabric)
    torch_io = importlib.import_module(f"{package}.plugins").TorchCheckpointIO
    strategy_base = importlib.import_module(f"{package}.strategies").Strategy
    strategy = fabric.strategy
    return type(strategy.checkpoint_io) is torch_io and type(strategy).save_checkpoint is strategy_base.save_checkpoint


class FabricSnapshot(LoopSnapshot):
    """The loop's snapshot, written through ``fabric.save`` on every rank when the strategy shards its state."""

    def __init__(self, loop: "FabricLoop") -> None:
        super().__init__(loop)
        self.fabric = loop.fabric
        self.streams = streams_with_torch_save(loop.fabric)

    def dump(self, rank_states: list[dict[str, Any]]) -> Any:
        if self.streams:
            return super().dump(rank_states)
        return {**self.loop.state, STATE_KEY: self.packed(rank_states)}  # fabric.save converts the objects itself

    def write(self, checkpoint: Any, path: str) -> None:
        self.fabric.save(path, checkpoint)


class FabricLoop(PreemptibleLoop):
    """A Lightning Fabric loop that survives preemption: :class:`~preemptible.loop.PreemptibleLoop` for a ``Fabric``.

    Args:
        fabric: the launched ``Fabric`` (``fabric.launch()`` already called when it launches its ranks).
        state: what ``fabric.save`` would get: the set-up model(s) and optimizer(s), schedulers, and
            plain values (restored with ``fabric.load(path, state)``, in place).
        config, **settings: the :class:`~preemptible.core.config.SessionConfig` or its fields.

    A checkpoint of it is a Fabric checkpoint: ``fabric.load(path, state)`` reads it anywhere.
    """

    #: Fabric's loaders set a DistributedSampler's epoch to their own iteration count; the loop keeps that count.
    sets_sampler_epoch = True

    def __init__(self, fabric: Any, state: dict[str, Any], *, config: Optional[SessionConfig] = None,
                 env: Optional[JobEnvironment] = None, **settings: Any) -> None:
        _fabric_package(fabric)
        self.fabric = fabric
        super().__init__(state, config=config, env=env, **settings)

    def place(self) -> tuple[int, int]:
        return int(self.fabric.global_rank), int(self.fabric.world_size)

    def load(self, path: str) -> dict[str, Any]:
        remainder: dict[str, Any] = self.fabric.load(path, self.state)
        return remainder

    def snapshot(self) -> LoopSnapshot:
        return FabricSnapshot(self)

    def inner_loader(self, loader: Any) -> Any:
        return hooks.inner_dataloader(loader)

    def before_exit(self) -> None:
        hooks.let_children_exit_first(hooks.launched_children(self.fabric), CHILD_EXIT_TIMEOUT)
