"""A hand-written PyTorch loop (``torch.distributed``, launched by ``srun`` or ``torchrun``) that survives preemption.

See :class:`PreemptibleLoop` and the README section "Your own loop: plain PyTorch and Lightning Fabric".
"""

from preemptible.loop.data import ResumableLoader
from preemptible.loop.loop import LoopSnapshot, PreemptibleLoop, checkpoint_step

__all__ = ["PreemptibleLoop", "ResumableLoader", "LoopSnapshot", "checkpoint_step"]
