"""``PreemptionCallback`` as a subclass of both packages' ``Callback``, for a process that imported both.

Which trainer it is attached to is only known at ``setup``; from there on every check acts on that
trainer's package (:func:`preemptible.lightning.namespace.of`). Both ``Callback`` classes are the
same hook-less base under two names, so inheriting from both adds nothing but the two identities.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback as LightningCallback
from pytorch_lightning.callbacks import Callback as PytorchLightningCallback

from preemptible.lightning import callback


class PreemptionCallback(callback.PreemptionCallback, LightningCallback, PytorchLightningCallback):  # type: ignore[misc]  # one implementation, typed against pytorch_lightning
    __doc__ = callback.PreemptionCallback.__doc__
