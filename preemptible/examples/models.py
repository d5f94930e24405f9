"""A tiny LightningModule and data on CPU, used by the demo, the tests and the SLURM templates' examples.

It has the ingredients that make exact resume hard: dropout, BatchNorm, random augmentation in
``__getitem__``, a shuffled loader, SGD with momentum and an LR schedule stepped every step.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from preemptible.lightning.namespace import package_in_use

# The model and data of the Lightning the process imported (``lightning.pytorch`` or ``pytorch_lightning``): a Trainer
# accepts only its own package's classes. No ``if TYPE_CHECKING`` import here: see preemptible.lightning.pltypes.
pl: Any = package_in_use().load_module()


class NoisyBlobs(Dataset):
    """``n`` points in ``dim`` dimensions, labels from a fixed linear rule, fresh noise on every access."""

    def __init__(self, n: int = 512, dim: int = 16, seed: int = 0, noise: float = 0.1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, generator=g)
        self.y = (self.x @ w > 0).long()
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Random augmentation from the process's global RNG (the worker's when num_workers > 0).
        return self.x[i] + self.noise * torch.randn_like(self.x[i]), self.y[i]


class TinyModel(pl.LightningModule):
    def __init__(self, dim: int = 16, hidden: int = 32, lr: float = 0.1, step_sleep: float = 0.0, onecycle: bool = False,
                 val_sleep: float | None = None, epoch_end_sleep: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 2))
        self.step_sleep = step_sleep
        # Pacing only (never a number): slow validation batches and end-of-epoch work, for tests and benchmarks.
        self.val_sleep = step_sleep if val_sleep is None else val_sleep
        self.epoch_end_sleep = epoch_end_sleep

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        # Dropout is off in eval mode; the noise in the dataset still draws from the RNG.
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("val_loss", loss, sync_dist=True)
        if self.val_sleep:
            time.sleep(self.val_sleep)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.epoch_end_sleep:
            time.sleep(self.epoch_end_sleep)

    def configure_optimizers(self) -> Any:
        # hparams is typed as a MutableMapping: index it (save_hyperparameters() stored both values).
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
        if self.hparams["onecycle"]:
            total = int(self.trainer.estimated_stepping_batches)
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams["lr"], total_steps=total)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class BlobsData(pl.LightningDataModule):
    """Shuffled train loader: a plain ``DataLoader`` by default, torchdata's ``StatefulDataLoader`` with ``stateful=True``."""

    def __init__(self, samples: int = 512, batch_size: int = 16, num_workers: int = 0, seed: int = 0,
                 stateful: bool = False, val_samples: int = 0) -> None:
        super().__init__()
        self.samples, self.batch_size, self.num_workers, self.seed = samples, batch_size, num_workers, seed
        self.stateful = stateful
        self.val_samples = val_samples  # at least this many validation samples (long validations for tests)

    def train_dataloader(self) -> Any:
        dataset = NoisyBlobs(self.samples, seed=self.seed)
        if not self.stateful:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

        if self.trainer is not None and self.trainer.world_size > 1:
            # Lightning would wrap a stateful sampler into its own, state-less DistributedSamplerWrapper:
            # give the stateful distributed sampler yourself (and use_distributed_sampler=False).
            sampler = StatefulDistributedSampler(dataset, num_replicas=self.trainer.world_size,
                                                 rank=self.trainer.global_rank, shuffle=True, seed=self.seed)
            return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        return StatefulDataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        size = max(self.samples // 4, self.batch_size, self.val_samples)
        return DataLoader(NoisyBlobs(size, seed=self.seed + 1), batch_size=self.batch_size,
                          num_workers=0)


def example_factory(samples: int = 256, batch_size: int = 16, num_workers: int = 0) -> tuple[Any, Any, dict[str, Any]]:
    """A factory for ``preemptible check preemptible.examples.models:example_factory``."""
    return TinyModel(), BlobsData(samples=samples, batch_size=batch_size, num_workers=num_workers), {"limit_val_batches": 0}
