"""The data and the step trace shared by the example loops (``fabric_loop.py``, ``torch_loop.py``).

The dataset draws noise in ``__getitem__`` from the global RNG, so that in-process loading and
worker processes both have augmentation randomness that a resume must reproduce.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, TextIO

import torch
from torch.utils.data import Dataset

from preemptible.core.environment import JobEnvironment
from preemptible.core.schema import TraceKind, trace_entry


class NoisyBlobs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Four Gaussian blobs in 8 dimensions; every sample gets fresh noise when it is loaded."""

    def __init__(self, samples: int = 256, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (samples,), generator=generator)
        centers = torch.randn(4, 8, generator=generator) * 3
        self.points = centers[self.labels] + torch.randn(samples, 8, generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[index] + 0.1 * torch.randn(8), self.labels[index]


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))


class StepTrace:
    """Appends one trace line per training step and the final weights' digest (``preemptible.core.schema``)."""

    def __init__(self, path: Optional[str], rank: int) -> None:
        self.file: Optional[TextIO] = open(path, "a") if path else None
        self.rank = rank
        self.attempt = JobEnvironment.from_env().restart_count

    def step(self, epoch: int, batch: int, step: int, loss: torch.Tensor) -> None:
        self._write(trace_entry(TraceKind.TRAIN, self.rank, epoch, batch, step, self.attempt,
                                loss=float(loss.detach()).hex()))

    def final(self, step: int, model: Any) -> None:
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        self._write(trace_entry(TraceKind.FINAL, self.rank, 0, None, step, self.attempt, weights=digest))

    def _write(self, entry: dict[str, Any]) -> None:
        if self.file is not None:
            print(json.dumps(entry), file=self.file, flush=True)
