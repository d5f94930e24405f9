"""The PyTorch Lightning face of preemptible; the rest of the package does not import Lightning."""

from preemptible.lightning.callback import PreemptionCallback

__all__ = ["PreemptionCallback"]
