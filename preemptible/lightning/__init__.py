"""The Lightning face of preemptible (``lightning.pytorch`` and ``pytorch_lightning`` alike); the rest of
the package does not import Lightning. See :mod:`preemptible.lightning.namespace` for which class is which."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "PreemptionCallback":  # the class for the Lightning this process imported, as preemptible.PreemptionCallback
        from preemptible.lightning.namespace import callback_class

        return callback_class()
    raise AttributeError(f"module 'preemptible.lightning' has no attribute {name!r}")
