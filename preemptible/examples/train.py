"""``python -m preemptible.examples.train``: the example training job (tiny model, CPU) used by the demo,
the tests and the SLURM examples. One command both starts and resumes the run.

Example::

    python -m preemptible.examples.train --run-dir runs/ex --max-steps 40 --devices 2
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preemptible.examples.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=None, help="run directory (default: $PREEMPTIBLE_RUN_DIR or runs/$SLURM_JOB_ID)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--max-epochs", type=int, default=-1)
    p.add_argument("--devices", type=int, default=1, help="processes (CPU ranks); >1 uses DDP over gloo")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--stateful-loader", action="store_true", help="torchdata's StatefulDataLoader instead of a plain DataLoader")
    p.add_argument("--val-every", type=float, default=None, help="val_check_interval (batches if >1, fraction if <=1)")
    p.add_argument("--onecycle", action="store_true", help="OneCycleLR sized by trainer.estimated_stepping_batches")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep in each training step")
    p.add_argument("--slow-until-resumed", action="store_true", help="apply --step-sleep only before the first resume")
    p.add_argument("--slow-attempts", type=int, default=None, metavar="N",
                   help="apply --step-sleep only in the first N attempts (PREEMPTIBLE_ATTEMPT or SLURM_RESTART_COUNT)")
    p.add_argument("--sanity-steps", type=int, default=0, help="validation batches in the sanity check (needs --val-every)")
    p.add_argument("--val-batches", type=int, default=2, help="validation batches per validation (limit_val_batches)")
    p.add_argument("--val-sleep", type=float, default=None,
                   help="seconds to sleep in each validation batch (default: --step-sleep), for slow validations")
    p.add_argument("--epoch-end-sleep", type=float, default=0.0, help="seconds of work in on_train_epoch_end")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--record", default=None, help="append per-batch losses and final weights digest (JSON lines)")
    p.add_argument("--signal-at", action="append", default=None, metavar="POINT",
                   help="testing: the process sends itself SIGUSR1 at POINT ('N', 'N+', 'vN', 'vN:K', 'vN:end', "
                        "'sanity', 'load', 'eN', see preemptible.tools.testing.SignalAtStep); repeat for later attempts")
    p.add_argument("--signal-rank", type=int, action="append", default=None, help="testing: only this rank signals itself")
    p.add_argument("--signal-name", default="USR1",
                   help="testing: the signal --signal-at sends (KILL: a crash without warning, STOP: a frozen rank)")
    p.add_argument("--fail-at-step", type=int, default=None, metavar="N",
                   help="testing: raise an error in the training code once global step N is done (a deterministic bug)")
    p.add_argument("--max-crash-requeues", type=int, default=None)
    p.add_argument("--requeue", default="auto")
    p.add_argument("--loggers", default="", help="comma-separated: tensorboard,csv,wandb (written under --log-dir)")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--every-n-steps", type=int, default=None, help="periodic safety checkpoints every N steps")
    p.add_argument("--every-n-minutes", type=float, default=None, help="periodic safety checkpoints every M minutes")
    p.add_argument("--sync-periodic", action="store_true", help="write periodic checkpoints in the training thread")
    p.add_argument("--deadline-in", type=float, default=None, metavar="SECONDS",
                   help="testing: pretend the job is killed SECONDS after it starts (as SLURM's time limit)")
    p.add_argument("--max-requeues", type=int, default=None)
    p.add_argument("--hold-for-signal", action="append", default=None, metavar="POINT",
                   help="testing: at POINT ('sanity': the first sanity-check batch; 'vN': the first validation "
                        "batch at step N; '-': nowhere) wait until a preemption signal has been recorded, so an "
                        "outside signal lands there whatever the machine's speed; repeat for later attempts")
    p.add_argument("--namespace", default="pytorch_lightning", choices=["pytorch_lightning", "lightning"],
                   help="import pytorch_lightning or lightning (lightning.pytorch); the other is not imported")
    p.add_argument("--no-ckpt-path", action="store_true",
                   help="call trainer.fit without ckpt_path: the attached callback resumes the run by itself")
    p.add_argument("--hold-until-exists", default=None, metavar="PATH",
                   help="testing: after the first optimizer step, wait until PATH exists")
    return p


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Build the example trainer from parsed ``args``, fit (start or resume), return a summary."""
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    import warnings

    from preemptible.lightning.namespace import by_name

    pl = by_name(args.namespace).load_module()  # before the example's model and callbacks, which follow it

    from preemptible import PreemptionCallback, latest_checkpoint
    from preemptible.examples.models import BlobsData, TinyModel
    from preemptible.tools.tracing import SignalAtStep, StepRecorder, state_digest

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    import time

    deadline = time.time() + args.deadline_in if args.deadline_in is not None else True
    cb = PreemptionCallback(run_dir=args.run_dir, requeue=args.requeue, max_requeues=args.max_requeues,
                            every_n_steps=args.every_n_steps, every_n_minutes=args.every_n_minutes,
                            async_save=not args.sync_periodic, deadline=deadline,
                            max_crash_requeues=args.max_crash_requeues)
    if args.no_ckpt_path:  # the callback finds the checkpoint itself; the script only peeks (read-only) at it
        found = latest_checkpoint(cb.run_dir)
        resume = str(found) if found else None
    else:
        resume = cb.resume_path()
    # --slow-until-resumed: sleep in steps only until the first preemption (the relaunch runs at full speed);
    # --slow-attempts N: only in the first N attempts.
    slow = not (args.slow_until_resumed and resume)
    if args.slow_attempts is not None:
        from preemptible.core.environment import JobEnvironment

        slow = slow and JobEnvironment.from_env().restart_count < args.slow_attempts
    model = TinyModel(step_sleep=args.step_sleep if slow else 0.0, onecycle=args.onecycle,
                      val_sleep=(args.val_sleep if args.val_sleep is not None else args.step_sleep) if slow else 0.0,
                      epoch_end_sleep=args.epoch_end_sleep if slow else 0.0)
    callbacks: list = [cb]
    if args.record:
        callbacks.append(StepRecorder(args.record))
    if args.signal_at:
        from preemptible.core.signals import parse_signal

        callbacks.append(SignalAtStep(args.signal_at, signum=parse_signal(args.signal_name), ranks=args.signal_rank))
    if args.fail_at_step is not None:
        callbacks.append(_failing_callback(pl, args.fail_at_step))
    if args.hold_for_signal or args.hold_until_exists:
        callbacks.append(_hold_callback(pl, args.hold_for_signal or [], args.hold_until_exists))
    data = BlobsData(samples=args.samples, batch_size=args.batch_size, num_workers=args.num_workers,
                     stateful=args.stateful_loader,
                     val_samples=args.val_batches * args.batch_size * args.devices * args.num_nodes)
    val_kwargs: dict = {"limit_val_batches": 0}
    if args.val_every is not None:
        every = int(args.val_every) if args.val_every > 1 else args.val_every
        val_kwargs = {"val_check_interval": every, "limit_val_batches": args.val_batches,
                      "num_sanity_val_steps": args.sanity_steps}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="ddp" if args.devices * args.num_nodes > 1 else "auto",
        max_steps=args.max_steps,
        max_epochs=args.max_epochs,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        logger=_loggers(args) or False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=not args.stateful_loader,
        **val_kwargs,
    )
    trainer.fit(model, datamodule=data, ckpt_path=None if args.no_ckpt_path else resume)
    if trainer.is_global_zero:
        print(f"training finished at global step {trainer.global_step}", flush=True)
    return {"global_step": trainer.global_step, "rank": trainer.global_rank, "weights": state_digest(model)}


#: Seconds a testing hold waits at most; then training goes on (and the test's own checks fail).
HOLD_TIMEOUT = 300.0


def _hold_callback(pl: Any, points: Sequence[str], path: str | None) -> Any:
    """Testing: a callback that pauses (sleeping only: no random numbers drawn, nothing trained) until a
    state is reached, so that a test waits on that state instead of racing the clock.

    ``points`` (one per attempt, as ``--signal-at``): wait at that point until this process has recorded
    a preemption signal. ``path``: after the first optimizer step, wait until the file exists.
    """
    import warnings

    from preemptible.core.environment import JobEnvironment
    from preemptible.tools.tracing import hold_until, preemption_signal_recorded

    attempt = JobEnvironment.from_env().restart_count
    point = points[attempt] if attempt < len(points) else "-"

    def wait(what: str, done: Any) -> None:
        if not hold_until(done, HOLD_TIMEOUT):
            warnings.warn(f"example: gave up waiting for {what} after {HOLD_TIMEOUT:.0f} s", stacklevel=2)

    class Hold(pl.Callback):
        def __init__(self) -> None:
            self.point = None if point == "-" else point
            self.path = path

        def on_validation_batch_start(self, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> None:
            if self.point == "sanity" and trainer.sanity_checking or (
                    self.point and self.point.startswith("v") and not trainer.sanity_checking
                    and trainer.global_step == int(self.point[1:])):
                self.point = None
                wait("a preemption signal", preemption_signal_recorded)

        def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> None:
            if self.path is not None and trainer.global_step >= 1:
                target, self.path = self.path, None
                wait(target, lambda: os.path.exists(target))

    return Hold()


def _failing_callback(pl: Any, step: int) -> Any:
    """Testing: a bug in the training code, raised on every rank once ``step`` is trained (every attempt)."""
    class Fail(pl.Callback):
        def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> None:
            if trainer.global_step == step:
                raise ValueError(f"example: a bug in the training code at step {step}")

    return Fail()


def _loggers(args: argparse.Namespace) -> list[Any]:
    from preemptible.lightning.namespace import by_name

    loggers = by_name(args.namespace)
    CSVLogger, TensorBoardLogger, WandbLogger = (loggers.load("loggers", name)
                                                 for name in ("CSVLogger", "TensorBoardLogger", "WandbLogger"))
    made: list[Any] = []
    for name in filter(None, args.loggers.split(",")):
        if name == "tensorboard":
            made.append(TensorBoardLogger(args.log_dir, name="tb"))
        elif name == "csv":
            made.append(CSVLogger(args.log_dir, name="csv"))
        elif name == "wandb":
            made.append(WandbLogger(save_dir=args.log_dir, project="preemptible-example"))
        else:
            raise SystemExit(f"--loggers: unknown logger {name!r}; use tensorboard, csv or wandb")
    return made


def main(argv: Sequence[str] | None = None) -> int:
    train(build_parser().parse_args(argv))
    return 0


def options_to_argv(**options: Any) -> list[str]:
    """``max_steps=40, onecycle=True, signal_at=["3", "9"]`` → ``["--max-steps", "40", "--onecycle", ...]``.

    ``True`` gives a bare flag, ``None``/``False`` nothing (but ``0`` is a value), a list or tuple one
    flag per item.
    """
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is True:
                argv.append(flag)
            elif v is not None and v is not False:
                argv += [flag, str(v)]
    return argv


def train_from_options(**options: Any) -> dict[str, Any]:
    """The same training from keyword options (``max_steps=40, devices=2, ...``), for submitit and notebooks."""
    return train(build_parser().parse_args(options_to_argv(**options)))


if __name__ == "__main__":
    sys.exit(main())
