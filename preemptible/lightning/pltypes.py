"""Lightning's class names for type annotations only: pytorch_lightning's for mypy, nothing at runtime.

Modules whose signatures jsonargparse reads (the callback's, the example model's) must not hold an
``if TYPE_CHECKING: import pytorch_lightning`` block: jsonargparse runs such blocks to resolve
postponed annotations, which would import ``pytorch_lightning`` into a process that uses ``lightning``
(and the other way round). They write ``"pl.Trainer"`` with ``from preemptible.lightning import pltypes as pl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer
else:
    Callback = LightningDataModule = LightningModule = Trainer = Any

__all__ = ["Callback", "LightningDataModule", "LightningModule", "Trainer"]
