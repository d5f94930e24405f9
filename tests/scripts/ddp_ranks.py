"""One rank of a 2-process gloo DDP plain loop on the session: ``python ddp_ranks.py RUN_DIR STEPS MODE [SLEEP]``.

Launched like ``torchrun`` does it (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set by the
test), so no Lightning import: a launch costs the torch import only. ``MODE``:

* ``finish``: train STEPS steps and end; the exit code must be 0.
* ``preempt``: rank 1 sends itself SIGUSR1 at step 3; both ranks must exit with the requeue code.
* ``fail``: rank 1 raises at step 3 (a bug in user code); every rank must exit non-zero, none with a code
  that asks for a requeue or reports a crash.

``TEST_RUN_DIR_VIEW`` gives one rank another run directory than the rest. Faults without warning
come through the session's own injection (``PREEMPTIBLE_INJECT``). At exit, a
handler registered before the session's (so it runs after it) prints whether the process group was
still alive: ``group at exit: destroyed`` or ``group at exit: alive``.
"""

import atexit
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from preemptible.core.checkpointing import DictSnapshot
from preemptible.core.session import PreemptionSession


def report_group() -> None:
    state = "alive" if dist.is_initialized() else "destroyed"
    print(f"group at exit: {state}", flush=True)


atexit.register(report_group)
run_dir, total, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
run_dir = os.environ.get("TEST_RUN_DIR_VIEW", run_dir)  # a rank that sees another directory (a node-local path)
sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
session = PreemptionSession(run_dir=run_dir, requeue="local", deadline=False)
resume = session.resume_path()
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
step = 0
snapshot = DictSnapshot(lambda: {"model": model.state_dict(), "step": step})
session.open(rank=rank, world_size=world)
session.start(checkpoint=resume)
session.training_started(step, epoch=0, loaded=resume)
try:
    while step < total:
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():  # a DDP-like gradient all-reduce: the collective a dead peer never joins
            dist.all_reduce(p.grad)
        opt.step()
        step += 1
        time.sleep(sleep)
        if step == 3 and rank == 1 and mode == "preempt":
            os.kill(os.getpid(), signal.SIGUSR1)
        if step == 3 and rank == 1 and mode == "fail":
            raise ValueError("a bug in the training step")
        session.boundary(step, epoch=0, snapshot=snapshot)
        session.leave_if_stopped()
except BaseException as exc:
    session.abandon(exc)
    raise
session.training_ended(step, epoch=0, snapshot=snapshot)
session.finished(step)
session.end()
print(f"rank {rank} finished at step {step}", flush=True)
