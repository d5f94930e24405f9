"""A loop that forgets to register its optimizer (SGD with momentum): ``preemptible check --loop`` must say it is not exact.

``python forgetful_loop.py STEPS``; the run directory comes from ``$PREEMPTIBLE_RUN_DIR``.
"""

import random
import sys
import time

import numpy as np
import torch

from preemptible.loop import PreemptibleLoop

torch.manual_seed(0)
random.seed(0)
np.random.seed(0)
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
with PreemptibleLoop({"model": model}) as loop:  # the optimizer's momentum is not in the checkpoint
    while loop.step < int(sys.argv[1]):
        x = torch.randn(16, 8)
        loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        time.sleep(0.05)
        loop.after_step()
