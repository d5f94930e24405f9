"""The example training job used by the demo, the tests and the SLURM examples.

``preemptible.examples.models`` holds the tiny model and data; ``python -m preemptible.examples.train``
is the job. Lightning is imported only when a model is asked for.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("BlobsData", "TinyModel", "example_factory"):
        from preemptible.examples import models

        return getattr(models, name)
    raise AttributeError(f"module 'preemptible.examples' has no attribute {name!r}")
