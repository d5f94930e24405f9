"""A plain PyTorch loop (no Lightning) on the trainer-neutral session: ``python plain_loop.py RUN_DIR STEPS TRACE [SLEEP]``.

Appends a step trace (``preemptible.core.schema``) to TRACE: each step's loss and the final weights' digest.
"""

import hashlib
import json
import sys
import time

import torch

from preemptible.core.checkpointing import DictSnapshot, rank_state_in
from preemptible.core.environment import JobEnvironment
from preemptible.core.rng import restore_rng
from preemptible.core.schema import TraceKind, trace_entry
from preemptible.core.session import PreemptionSession

run_dir, total, trace = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "a")
sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0  # seconds per step, so that a signal lands mid-run
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
step, attempt = 0, JobEnvironment.from_env().restart_count
session = PreemptionSession(run_dir=run_dir, requeue="local", deadline=False)
resume = session.resume_path()
if resume:
    ckpt = torch.load(resume, weights_only=True)
    model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
    step = ckpt["step"]
    restore_rng(rank_state_in(ckpt, 0)["rng"])
snapshot = DictSnapshot(lambda: {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step})
session.open(rank=0, world_size=1)
session.start(checkpoint=resume)
session.training_started(step, epoch=0, loaded=resume)
session.leave_if_stopped()
while step < total:
    x = torch.randn(32, 8)  # random data and dropout: the RNG must continue exactly
    loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
    opt.zero_grad(), loss.backward(), opt.step()
    step += 1
    time.sleep(sleep)
    entry = trace_entry(TraceKind.TRAIN, 0, 0, None, step, attempt, loss=float(loss.detach()).hex())
    print(json.dumps(entry), file=trace, flush=True)
    session.boundary(step, epoch=0, snapshot=snapshot)
    session.leave_if_stopped()  # raises Preempted (exit code 144) after the emergency checkpoint
session.training_ended(step, epoch=0, snapshot=snapshot)
session.finished(step)
session.end()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps(trace_entry(TraceKind.FINAL, 0, 0, None, step, attempt, weights=digest)), file=trace, flush=True)
