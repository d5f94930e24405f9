"""A complete plain PyTorch (``torch.distributed``) loop that survives preemption (README example, run by the tests).

``python -m preemptible.examples.torch_loop --run-dir runs/plain [--ddp] [--max-steps 40] [--num-workers 2]``

``--ddp``: one process per rank, started by ``torchrun`` or ``srun`` (``init_process_group`` reads
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), DDP over gloo on CPU.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from preemptible.examples.loop_data import NoisyBlobs, StepTrace, make_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", default=None, help="default: $PREEMPTIBLE_RUN_DIR")
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--every-n-steps", type=int, default=None, help="periodic (background) checkpoints")
    p.add_argument("--trace", default=None, help="append every step's loss (a test's record) here")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step, so a test's signal lands mid-run")
    args = p.parse_args(argv)

    # --- README: torch example ---
    from preemptible.loop import PreemptibleLoop

    if args.ddp:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if args.ddp else 0
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)  # every generator the process has: the checkpoint holds them all
    model = make_model()
    if args.ddp:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    dataset = NoisyBlobs()
    sampler: Optional[DistributedSampler[int]] = DistributedSampler(dataset, shuffle=True, seed=1234) if args.ddp else None
    loader = DataLoader(dataset, batch_size=16, shuffle=sampler is None, sampler=sampler,
                        num_workers=args.num_workers)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "samples_seen": 0}
    trace = StepTrace(args.trace, rank)

    with PreemptibleLoop(state, run_dir=args.run_dir, every_n_steps=args.every_n_steps) as loop:
        train = loop.dataloader(loader)  # a resumed epoch continues at its next batch
        while loop.step < args.max_steps:
            if sampler is not None:
                sampler.set_epoch(loop.epoch)  # the epoch this pass over the loader is (a resumed one continues)
            for x, y in train:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                state["samples_seen"] += len(x)
                trace.step(loop.epoch, train.batches_this_epoch - 1, loop.step + 1, loss)
                time.sleep(args.step_sleep)
                loop.after_step()  # all ranks agree; on a stop: checkpoint, requeue, exit 144
                if loop.step == args.max_steps:
                    break
    # --- README: end ---
    trace.final(loop.step, model)
    if args.ddp:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
