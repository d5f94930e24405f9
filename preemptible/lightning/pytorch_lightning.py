"""``PreemptionCallback`` as a ``pytorch_lightning.Callback`` (for scripts that ``import pytorch_lightning``).

``preemptible.PreemptionCallback`` resolves to this class when the process has imported
``pytorch_lightning`` only; name it explicitly (``class_path: preemptible.lightning.pytorch_lightning.PreemptionCallback``)
to pin it.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback

from preemptible.lightning import callback


class PreemptionCallback(callback.PreemptionCallback, Callback):
    __doc__ = callback.PreemptionCallback.__doc__
