"""``preemptible check MODULE:FACTORY``: verify that your model resumes bit for bit."""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from preemptible.core.schema import TraceKind

EXAMPLES = """
examples:
  preemptible check preemptible.examples.models:example_factory --steps 24 --preempt-at 10
  preemptible check mypkg.train:make_experiment --steps 40 --ranks 2      # random preemption step
  preemptible check --preempt-at 12 --loop python train.py --max-steps 40 # your own Fabric / PyTorch loop

FACTORY is a function returning (LightningModule, datamodule_or_dataloaders, trainer_kwargs). It is
called in each process after pl.seed_everything(--seed); trainer_kwargs may not set max_steps,
devices or callbacks beyond extra callbacks (they are the check's). Exit code 0 when the runs are
bitwise identical, 1 when they are not.

--loop COMMAND...: a training script of your own on preemptible.fabric.FabricLoop or
preemptible.loop.PreemptibleLoop (launching its ranks itself, e.g. Fabric(devices=2)), which takes
its run directory from $PREEMPTIBLE_RUN_DIR. It runs uninterrupted and preempted after
--preempt-at (default: a random step below --steps), and the final checkpoints of both runs (every
registered object, every rank's RNG and data position) are compared value by value.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="check that a model of yours resumes bit for bit after a preemption",
                       description="Run FACTORY's model uninterrupted and again with a real preemption and "
                                   "relaunch, and compare every step's loss and weights and the final tensors.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", metavar="MODULE:FACTORY", nargs="?", default=None)
    p.add_argument("--steps", type=int, default=20, help="training steps of each run (default 20)")
    p.add_argument("--preempt-at", type=int, default=None, metavar="STEP", help="signal after this step (default: random)")
    p.add_argument("--ranks", type=int, default=1, choices=(1, 2), help="1 process or 2-rank DDP on CPU")
    p.add_argument("--signal", default="USR1")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workdir", default="runs/check", help="where both runs and their logs go")
    p.add_argument("--loop", nargs=argparse.REMAINDER, default=None, metavar="COMMAND",
                   help="check your own loop script instead of a factory: everything after --loop is the command")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from preemptible.tools.checking import check_resume

    if args.loop is not None or args.factory is None:
        return _run_loop_check(args)
    _check_spec(args.factory)
    console = Console()
    with console.status(f"running {args.factory}: uninterrupted, then preempted..."):
        report = check_resume(args.factory, steps=args.steps, preempt_at=args.preempt_at, ranks=args.ranks,
                              workdir=args.workdir, signal=args.signal, seed=args.seed)
    if report.error:
        return _could_not_compare(console, escape(args.factory), report.error)
    console.print(f"signal after step {report.preempt_at}; all ranks stopped at step {report.stop_step}; "
                  f"resumed at step {report.resumed_from_step}")
    table = Table(title="per-step comparison (training batches)", title_justify="left")
    for col in ("rank", "epoch", "batch", "step", "loss (uninterrupted)", "loss (preempted)", "weights", "same"):
        table.add_column(col)
    first = report.first_difference
    for c in report.comparisons:
        if c.key[0] != TraceKind.TRAIN:
            continue
        mark = "[green]yes" if c.equal else "[red]NO"
        table.add_row(str(c.key[1]), str(c.key[2]), str(c.key[3]), str(c.key[4]), _loss(c.reference), _loss(c.resumed),
                      {None: "-", True: "equal", False: "[red]differ"}[c.weights_equal], mark)
    console.print(table)
    if report.replayed:
        console.print(f"[red]{len(report.replayed)} batch(es) trained twice, first {report.replayed[0]}")
    if report.missing:
        console.print(f"[red]{len(report.missing)} batch(es) never trained after the resume, first {report.missing[0]}")
    for line in report.tensor_differences[:10]:
        console.print(f"[red]final state: {line}")
    if report.identical:
        console.print(f"[bold green]identical: all {len(report.comparisons)} losses, every step's weights and the final "
                      "tensors match bit for bit")
        return 0
    if first is not None:
        console.print(f"[bold red]the runs part at rank {first.key[1]}, step {first.key[4]} "
                      f"(epoch {first.key[2]}, batch {first.key[3]})")
    console.print("[bold red]not identical[/] — see the README's 'What is exact' for the usual causes")
    return 1


def _run_loop_check(args: argparse.Namespace) -> int:
    import random

    from rich.console import Console
    from rich.markup import escape

    from preemptible.tools.loopcheck import check_loop_resume

    command = list(args.loop or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if args.factory is not None or not command:
        raise ValueError("give either MODULE:FACTORY or --loop COMMAND..., e.g. preemptible check --loop python train.py")
    point = args.preempt_at if args.preempt_at is not None else random.Random(args.seed).randint(1, max(1, args.steps - 2))
    console = Console()
    with console.status(f"running {' '.join(command)}: uninterrupted, then preempted after step {point}..."):
        report = check_loop_resume(command, preempt_at=point, workdir=args.workdir, signal=args.signal)
    if report.error:
        return _could_not_compare(console, "the loop", report.error)
    console.print(f"signal after step {report.preempt_at}; all ranks stopped at step {report.stop_step}; "
                  f"resumed at step {report.resumed_from_step}; both runs ended at step {report.final_step}")
    for line in report.differences[:20]:
        console.print(f"[red]final state: {escape(line)}")
    if report.identical:
        console.print(f"[bold green]identical: all {report.compared} values of the final state (weights, optimizer, "
                      "schedulers, your counters, every rank's RNG and data position) match bit for bit")
        return 0
    if all(".rng." in line or ".epoch_rng." in line or ".inject." in line for line in report.differences):
        console.print("[red]only random-generator states differ: a generator that is never seeded (python's random, "
                      "numpy) starts differently in every process; seed every one (e.g. lightning's seed_everything)")
    console.print(f"[bold red]not identical[/] ({len(report.differences)} difference(s)) — see the README's "
                  "'What is exact' for the usual causes")
    return 1


def _loss(hexed: Any) -> str:
    return "-" if hexed is None else f"{float.fromhex(hexed):.9g}"


def _check_spec(spec: str) -> None:
    """A malformed MODULE:FACTORY or a top-level package that is nowhere is an error before any run starts.

    Nothing is imported here (the user's module is imported only in the runs' processes); the runs start
    with ``python -m``, so the current directory is searched as well.
    """
    module, _, attr = spec.partition(":")
    if not module or not attr or not attr.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ValueError(f"factory {spec!r} is not MODULE:FACTORY, e.g. mypkg.train:make_experiment")
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None and importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path]) is None:
        raise ValueError(f"factory {spec!r}: no module named {top!r} (not installed, and not in the current directory "
                         "or on PYTHONPATH)")


def _could_not_compare(console: Any, what: str, error: str) -> int:
    """Print why a check could not compare the two runs (and the likely cause) on a rich console; exit code 2."""
    from rich.markup import escape

    console.print(f"[red]check of {what} could not compare: {escape(error)}")
    cause = _failure_cause(error)
    if cause:
        console.print(f"[red]{escape(cause)}")
    return 2


def _failure_cause(error: str) -> Optional[str]:
    """The exception a failed run ended with, from the log its error names (``...; see <log>``)."""
    match = re.search(r"see (\S+\.log)$", error)
    if not match or not Path(match.group(1)).is_file():
        return None
    lines = Path(match.group(1)).read_text(errors="replace").splitlines()
    causes = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)(:|$)", line)]
    return causes[-1] if causes else None
