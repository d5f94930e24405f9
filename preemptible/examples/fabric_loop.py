"""A complete Lightning Fabric training loop that survives preemption (the README's example, run by the tests).

``python -m preemptible.examples.fabric_loop --run-dir runs/fabric [--devices 2] [--max-steps 40] [--num-workers 2]``

With ``--devices 2`` Fabric starts the second rank itself (DDP over gloo on CPU); under ``srun``
(``preemptible sbatch --ntasks-per-node 2``) the ranks come from SLURM instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from preemptible.examples.loop_data import NoisyBlobs, StepTrace, make_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", default=None, help="default: $PREEMPTIBLE_RUN_DIR")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--every-n-steps", type=int, default=None, help="periodic (background) checkpoints")
    p.add_argument("--package", choices=("lightning.fabric", "lightning_fabric"), default="lightning.fabric")
    p.add_argument("--trace", default=None, help="append every step's loss (a test's record) here")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step, so a test's signal lands mid-run")
    args = p.parse_args(argv)
    Fabric = importlib.import_module(args.package).Fabric

    # --- README: fabric example ---
    from preemptible.fabric import FabricLoop

    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    fabric.seed_everything(1234)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(NoisyBlobs(), batch_size=16, shuffle=True,
                                                 num_workers=args.num_workers))
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "samples_seen": 0}
    trace = StepTrace(args.trace, fabric.global_rank)

    with FabricLoop(fabric, state, run_dir=args.run_dir, every_n_steps=args.every_n_steps) as loop:
        loader = loop.dataloader(loader)  # a resumed epoch continues at its next batch
        while loop.step < args.max_steps:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                fabric.backward(loss)
                optimizer.step()
                scheduler.step()
                state["samples_seen"] += len(x)
                trace.step(loop.epoch, loader.batches_this_epoch - 1, loop.step + 1, loss)
                time.sleep(args.step_sleep)
                loop.after_step()  # all ranks agree; on a stop: checkpoint, requeue, exit 144
                if loop.step == args.max_steps:
                    break
    # --- README: end ---
    trace.final(loop.step, model)
    fabric.print(f"fabric_loop: finished at step {loop.step}, {state['samples_seen']} samples per rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
