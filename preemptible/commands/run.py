"""``preemptible run``: the local preemption simulator."""

from __future__ import annotations

import argparse
import re
from typing import Any

from preemptible.core.exit import REQUEUE_EXIT_CODE
from preemptible.tools.simulator import LocalSupervisor, Preemption, RunSummary

EXAMPLES = f"""
examples:
  # preempt once with SIGUSR1 when training reaches step 20, relaunch, resume
  preemptible run --run-dir runs/exp1 --preempt-at-step 20 -- python train.py

  # SIGTERM (what SLURM sends on preemption) 30 s after start, at most 3 relaunches
  preemptible run --run-dir runs/exp1 --preempt-after 30 --signal TERM --max-restarts 3 -- python train.py

  # preempt twice: at step 10 in the first attempt and at step 25 in the second
  preemptible run --run-dir runs/exp1 --preempt-at-step 10 --preempt-at-step 25 -- python train.py

  # a crash without warning: SIGKILL rank 1 at step 8 (as the OOM killer); or freeze it (SIGSTOP)
  preemptible run --run-dir runs/exp1 --kill-at-step 8 --target rank:1 -- python train.py --devices 2
  preemptible run --run-dir runs/exp1 --freeze-at-step 8 --target rank:1 -- python train.py --devices 2

A signal or fault planned at a step lands at that step: the rank does it to itself there
(PREEMPTIBLE_INJECT), however short the steps are.

The command is relaunched while it exits with {REQUEUE_EXIT_CODE} (preemptible.REQUEUE_EXIT_CODE), and after a
crash (killed by a signal, no error recorded by the training code) from its newest checkpoint, at most
max_crash_requeues times and never after two crashes in a row without a new checkpoint (--no-crash-restart: never).
Ctrl-C (or SIGTERM to this command) asks the run to checkpoint and stop: no relaunch after it
(Ctrl-C twice kills it without a checkpoint). Running the same command again resumes.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run a training command, preempt it with a real signal, relaunch it",
                       description="Run COMMAND, send it a real signal at a planned point (whole process tree), "
                                   "relaunch it while it asks to be requeued, and print what happened.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    when = p.add_mutually_exclusive_group()
    when.add_argument("--preempt-at-step", type=int, action="append", metavar="N",
                      help="signal when training reaches global step N (repeat for later attempts)")
    when.add_argument("--preempt-after", type=float, action="append", metavar="SECONDS",
                      help="signal SECONDS after the attempt starts (repeat for later attempts)")
    when.add_argument("--kill-at-step", type=int, action="append", metavar="N",
                      help="SIGKILL the --target at global step N, without warning (repeat for later attempts)")
    when.add_argument("--freeze-at-step", type=int, action="append", metavar="N",
                      help="SIGSTOP the --target at global step N: a hung rank (repeat for later attempts)")
    p.add_argument("--signal", default="USR1", help="USR1 (sbatch --signal), TERM (preemption), USR2 (submitit); default USR1")
    p.add_argument("--target", default="tree", help="'tree' (every process, like SLURM) or 'rank:N' (one rank only)")
    p.add_argument("--max-restarts", type=int, default=10, metavar="K", help="relaunch at most K times (default 10)")
    p.add_argument("--run-dir", default=None,
                   help="run directory (exported as PREEMPTIBLE_RUN_DIR); needed for --preempt-at-step")
    p.add_argument("--no-crash-restart", action="store_true",
                   help="do not relaunch an attempt that crashed (by default it resumes from its newest checkpoint)")
    p.add_argument("--timeout", type=float, default=3600, help="kill an attempt that runs longer than this (seconds)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from preemptible.core.signals import parse_signal

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    # checked before anything starts, also when no preemption is planned (a typo is not silently ignored)
    parse_signal(args.signal)
    if args.target != "tree" and not re.fullmatch(r"rank:\d+", args.target):
        raise ValueError(f"unknown --target {args.target!r}: use 'tree' or 'rank:N'")
    plan = [Preemption(at_step=n, signal=args.signal, target=args.target) for n in args.preempt_at_step or []]
    plan += [Preemption(after_seconds=s, signal=args.signal, target=args.target) for s in args.preempt_after or []]
    plan += [Preemption(at_step=n, fault="kill", target=args.target) for n in args.kill_at_step or []]
    plan += [Preemption(at_step=n, fault="freeze", target=args.target) for n in args.freeze_at_step or []]
    console = Console(stderr=True)
    with console.status("starting...") as status:
        def tick(attempt: int, progress: Any) -> None:
            step = f"step {progress['step']}" if progress else "starting (imports, set-up)"
            status.update(f"attempt {attempt}: {step}")

        supervisor = LocalSupervisor(command, run_dir=args.run_dir, plan=plan, max_restarts=args.max_restarts,
                                     timeout=args.timeout, on_tick=tick, crash_restarts=not args.no_crash_restart,
                                     on_event=lambda line: console.print(f"[bold cyan]preemptible run[/]: {line}"))
        summary = supervisor.run()
    console.print(summary_table(summary))
    if summary.stopped_by is not None:
        console.print(f"preemptible run: stopped by {summary.stopped_by}; run the same command again to resume")
    code = summary.exit_code
    return 1 if code is None else (code if code >= 0 else 128 - code)


def summary_table(summary: RunSummary) -> Any:
    from rich.table import Table

    table = Table(title="preemptible run: summary", title_justify="left")
    for col in ("attempt", "exit", "signal", "sent at step", "stopped at step", "resumed from", "signal→commit s",
                "restart s", "cause"):
        table.add_column(col, justify="right")
    for i, a in enumerate(summary.attempts):
        nxt = summary.attempts[i + 1] if i + 1 < len(summary.attempts) else None
        table.add_row(
            str(a.index), _fmt(a.exit_code) + (" (killed: timeout)" if a.timed_out else ""),
            a.signal_name or "-", _fmt(a.signal_step), _fmt(a.stop_step),
            _fmt(nxt.resumed_from_step) if nxt else "-",
            _fmt(a.signal_to_commit, "{:.3f}"), _fmt(summary.restart_seconds(i), "{:.1f}"), _fmt(a.stop_cause),
        )
    return table


def _fmt(value: Any, pattern: str = "{}") -> str:
    return "-" if value is None else pattern.format(value)
