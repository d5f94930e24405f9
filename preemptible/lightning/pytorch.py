"""``PreemptionCallback`` as a ``lightning.pytorch.Callback`` (for scripts that ``import lightning``).

``preemptible.PreemptionCallback`` resolves to this class when the process has imported
``lightning.pytorch`` only; name it explicitly (``class_path: preemptible.lightning.pytorch.PreemptionCallback``)
to pin it.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from preemptible.lightning import callback


class PreemptionCallback(callback.PreemptionCallback, Callback):  # type: ignore[misc]  # one implementation, typed against pytorch_lightning
    __doc__ = callback.PreemptionCallback.__doc__
