"""One rank of a 2-process gloo DDP Lightning run that reports how it loaded its checkpoint on resume.

``python resume_reads.py RUN_DIR MODE REPORT_DIR`` with torchrun-style variables set by the test
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so no Lightning launcher
forks behind the test's back. The model is the example's tiny network plus 8 MB of frozen weights, so
that whether a rank reads the whole file shows in its counters. ``MODE``:

* ``preempt``: every rank sends itself SIGUSR1 after step 3 (as SLURM signals every task): exit 144.
* ``resume``: resume and finish; each rank writes ``REPORT_DIR/rank<N>.json`` with what the kernel says:
  ``read_bytes`` (``/proc/self/io`` ``rchar``: bytes this process passed through ``read()``) from the
  module's ``setup`` (before the restore) to its ``on_load_checkpoint`` (after Lightning's load, before
  the weights are copied), whether the checkpoint file was memory-mapped then and still at the first
  training step (``/proc/self/maps``), and whether the weights and optimizer state at that first step
  equal the file's (loaded again, plainly, for the comparison).
"""

import gc
import json
import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from preemptible import PreemptionCallback
from preemptible.examples.models import BlobsData, TinyModel

run_dir, mode, report_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
rank = int(os.environ["RANK"])
torch.set_num_threads(1)


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def mapped(path: str) -> bool:
    real = os.path.realpath(path)
    return any(line.rstrip().endswith(real) for line in Path("/proc/self/maps").read_text().splitlines())


class Ballasted(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.ballast = nn.Parameter(torch.rand(2 * (1 << 20), generator=torch.Generator().manual_seed(7)),
                                    requires_grad=False)
        self.report: dict = {}

    def configure_optimizers(self):  # momentum: optimizer state that a resume restores
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def setup(self, stage: str) -> None:
        self.report["rchar_before"] = rchar()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.report["read_bytes"] = rchar() - self.report["rchar_before"]
        self.report["mapped_while_loading"] = mapped(resume)

    def on_train_start(self) -> None:
        if resume is None:
            return  # the run that preempts itself starts fresh: nothing to report
        gc.collect()
        self.report["mapped_at_first_step"] = mapped(resume)
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        own = self.state_dict()
        self.report["weights_equal"] = all(torch.equal(own[k], v) for k, v in saved["state_dict"].items())
        opt = self.trainer.optimizers[0]
        buffers = [opt.state[p]["momentum_buffer"] for group in opt.param_groups for p in group["params"]
                   if p in opt.state and "momentum_buffer" in opt.state[p]]
        saved_buffers = [s["momentum_buffer"] for s in saved["optimizer_states"][0]["state"].values()]
        self.report["momentum_equal"] = bool(buffers) and len(buffers) == len(saved_buffers) and all(
            torch.equal(a, b) for a, b in zip(buffers, saved_buffers))
        self.report["checkpoint_bytes"] = os.path.getsize(resume)
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / f"rank{rank}.json").write_text(json.dumps(self.report))


class SignalAfterStep3(pl.Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        if mode == "preempt" and trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)


callback = PreemptionCallback(run_dir=run_dir, requeue="local", save_on_finish=False)
resume = callback.resume_path()
if mode == "resume" and not resume:
    raise SystemExit("nothing to resume from")
pl.seed_everything(1234, verbose=False)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     callbacks=[SignalAfterStep3(), callback])
trainer.fit(Ballasted(), datamodule=BlobsData(samples=8 * 16 * 2, batch_size=16), ckpt_path=resume)
