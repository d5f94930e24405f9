"""One configuration of the example model, trained with or without preemptible: a reference independent of it.

``python plain_vs_callback.py --arm plain|callback|periodic --trace TRACE --run-dir DIR [--devices N] ...``

* ``plain``: a plain Lightning run, the way a user without preemptible writes it. No preemptible training
  code is loaded (checked at the end: the process fails if ``preemptible.lightning`` or the session was
  imported); only the model and data definitions and the step recorder come from the package.
* ``callback``: the same run with ``PreemptionCallback(run_dir=DIR, requeue="none")`` attached and
  ``ckpt_path=cb.resume_path()`` (None: a fresh run directory).
* ``periodic``: as ``callback``, with background periodic checkpoints every ``--every-n-steps`` steps.

Every arm seeds, builds the model, the data and the Trainer the same way (the example job's settings:
``preemptible/examples/train.py``), and records every training and validation loss, the weights after
every optimizer step and the final weights of every rank (:class:`preemptible.tools.tracing.StepRecorder`).
``--devices 2`` is DDP over gloo on CPU (Lightning starts the second rank by re-running this script).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

ARMS = ("plain", "callback", "periodic")
#: Modules that are preemptible's training machinery (not the model, the data or the recorder).
PREEMPTIBLE_TRAINING_MODULES = ("preemptible.lightning", "preemptible.core.session", "preemptible.core.checkpointing",
                                "preemptible.core.signals", "preemptible.core.data")
#: What the example model may load to find out which Lightning package the process uses: the package's
#: face and the chooser, none of the callback, hooks, saving or loaders.
PACKAGE_CHOOSERS = ("preemptible.lightning", "preemptible.lightning.namespace", "preemptible.lightning.pltypes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=ARMS, required=True)
    p.add_argument("--trace", required=True, help="the step trace (JSON lines) to append to")
    p.add_argument("--run-dir", required=True, help="the callback's run directory (unused by the plain arm)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--val-every", type=int, default=5, help="val_check_interval in batches (mid-epoch validation)")
    p.add_argument("--sanity-steps", type=int, default=2, help="num_sanity_val_steps (Lightning's default: 2)")
    p.add_argument("--every-n-steps", type=int, default=3, help="the periodic arm's checkpoint interval")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)

    os.environ.setdefault("PL_DISABLE_FORK", "1")
    import pytorch_lightning as pl

    from preemptible.examples.models import BlobsData, TinyModel
    from preemptible.tools.tracing import StepRecorder

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    callbacks: list = []
    resume = None
    if args.arm != "plain":
        from preemptible import PreemptionCallback

        cb = PreemptionCallback(run_dir=args.run_dir, requeue="none",
                                every_n_steps=args.every_n_steps if args.arm == "periodic" else None)
        resume = cb.resume_path()
        if resume is not None:
            raise SystemExit(f"plain_vs_callback: {args.run_dir} holds a checkpoint ({resume}); give a fresh run directory")
        callbacks.append(cb)
    callbacks.append(StepRecorder(args.trace, params=True))
    model = TinyModel()
    data = BlobsData(samples=args.samples, batch_size=args.batch_size, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        val_check_interval=args.val_every,
        limit_val_batches=2,
        num_sanity_val_steps=args.sanity_steps,
    )
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    if args.arm == "plain":
        loaded = sorted(m for m in sys.modules
                        if m.startswith(PREEMPTIBLE_TRAINING_MODULES) and m not in PACKAGE_CHOOSERS)
        if loaded:
            raise SystemExit(f"plain_vs_callback: the plain arm loaded preemptible's training code: {loaded}")
    print(f"plain_vs_callback: arm {args.arm} rank {trainer.global_rank} finished at step {trainer.global_step}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
