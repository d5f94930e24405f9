"""``preemptible demo``: an uninterrupted run and a preempted-and-relaunched run, side by side."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from preemptible.core.schema import read_trace, trace_key

EXAMPLES = """
examples:
  preemptible demo                      # 2-rank DDP on CPU when there are >= 2 cores
  preemptible demo --devices 1 --steps 60
"""


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="see a preemption and an exact resume on a tiny CPU model (~1 minute)",
                       description="Train a tiny model twice: once uninterrupted, once preempted with real signals "
                                   "(SIGUSR1, then SIGTERM) and relaunched; compare every loss bit for bit.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=None, help="CPU ranks (default: 2 if there are >= 2 cores, else 1)")
    p.add_argument("--steps", type=int, default=48, help="training steps (default 48)")
    p.add_argument("--out", default="runs/demo", help="where the two runs are written (an earlier demo's output there is "
                                                       "replaced; a directory holding other files is refused)")
    p.set_defaults(func=run_demo)


#: What a demo writes into --out: all that may be there when it empties the directory.
_OUTPUTS = frozenset({"reference", "preempted", "reference.jsonl", "preempted.jsonl", "reference.log", "preempted.log"})


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from preemptible.tools.simulator import LocalSupervisor, Preemption

    console = Console(width=None if sys.stdout.isatty() else 110)
    devices = args.devices or (2 if (os.cpu_count() or 1) >= 2 else 1)
    out = Path(args.out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory")
        strangers = sorted(p.name for p in out.iterdir() if p.name not in _OUTPUTS)
        if strangers:  # emptied only when it holds nothing but an earlier demo's output
            raise ValueError(f"--out {out} holds files that are not an earlier demo's ({', '.join(strangers[:5])}): "
                             "choose a new or empty directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = args.steps

    def command(record: Path) -> list[str]:
        return [sys.executable, "-m", "preemptible.examples.train", "--max-steps", str(steps), "--devices", str(devices),
                "--samples", "512", "--step-sleep", "0.03", "--val-every", "10", "--record", str(record)]

    console.rule("[bold]preemptible demo")
    console.print(f"Tiny MLP (dropout, BatchNorm, noisy augmentation, shuffled loader, SGD+momentum, per-step LR), "
                  f"{devices} CPU rank(s){' with DDP over gloo' if devices > 1 else ''}, {steps} steps.\n")
    ref_record, run_record = out / "reference.jsonl", out / "preempted.jsonl"
    with console.status("1/2 uninterrupted reference run..."):
        t0 = time.time()
        ref = LocalSupervisor(command(ref_record), run_dir=out / "reference", timeout=300,
                              stdout=open(out / "reference.log", "wb")).run()
        ref_seconds = time.time() - t0
    if ref.exit_code != 0:
        console.print(f"[red]the reference run failed (exit {ref.exit_code}); see {out / 'reference.log'}")
        return 1
    plan = [Preemption(at_step=steps * 3 // 10, signal=signal.SIGUSR1),
            Preemption(at_step=steps * 7 // 10, signal=signal.SIGTERM)]
    with console.status("2/2 preempted run: SIGUSR1, relaunch, SIGTERM, relaunch..."):
        t0 = time.time()
        run = LocalSupervisor(command(run_record), run_dir=out / "preempted", plan=plan, timeout=300,
                              stdout=open(out / "preempted.log", "wb")).run()
        run_seconds = time.time() - t0
    if run.exit_code != 0:
        console.print(f"[red]the preempted run did not finish (exit {run.exit_code}); see {out / 'preempted.log'}")
        return 1

    ref_by_attempt, ref_final = _losses(ref_record)
    ref_losses = {k[:5]: v for k, v in ref_by_attempt.items()}  # one attempt: key it without the attempt
    got_losses, got_final = _losses(run_record)
    table = Table(title="Preemptions", title_justify="left")
    for col in ("#", "signal", "sent at step", "all ranks stopped at", "signal→commit", "resumed at step",
                "steps lost", "losses after resume equal to reference"):
        table.add_column(col, justify="right")
    all_equal = True
    for i, a in enumerate(run.attempts[:-1]):
        nxt = run.attempts[i + 1]
        after = [k for k in got_losses if k[4] >= (nxt.resumed_from_step or 0) and k[5] == nxt.index]
        equal = sum(got_losses[k] == ref_losses.get(k[:5]) for k in after)
        all_equal &= equal == len(after)
        lost = (a.stop_step or 0) - (nxt.resumed_from_step or 0)
        table.add_row(str(i + 1), a.signal_name or "-", str(a.signal_step), str(a.stop_step),
                      f"{a.signal_to_commit:.3f} s" if a.signal_to_commit is not None else "-",
                      str(nxt.resumed_from_step), str(lost), f"{equal}/{len(after)}")
    console.print(table)
    replayed = len(got_losses) - len({k[:5] for k in got_losses})
    same_set = {k[:5] for k in got_losses} == {k[:5] for k in ref_losses}
    weights_equal = got_final == ref_final
    verdict = all_equal and same_set and weights_equal and replayed == 0
    skipped = len({k[:5] for k in ref_losses} - {k[:5] for k in got_losses})
    console.print(f"batches replayed: {replayed}   batches skipped: {skipped}   "
                  f"final weights bitwise equal on every rank: {'yes' if weights_equal else 'NO'}")
    console.print(f"wall time: reference {ref_seconds:.1f} s, preempted run {run_seconds:.1f} s "
                  f"({len(run.attempts)} attempts, each pays process start-up)")
    if verdict:
        console.print("[bold green]The preempted run is the same run: every loss and the final weights match bit for bit.")
    else:
        console.print("[bold red]The preempted run differs from the reference (see the table).")
    console.print(f"Run directories, logs and records: {out}/   (try: preemptible status {out / 'preempted'})")
    return 0 if verdict else 1


def _losses(record: Path) -> tuple[dict[tuple[Any, ...], str], dict[int, str]]:
    """Loss by (kind, rank, epoch, batch, step, attempt): a batch replayed by a later attempt keeps both entries."""
    trace = read_trace(record)
    # A validation's logged metrics (kind val_metrics) are compared like its losses.
    losses = {(*trace_key(e), e["attempt"]): e["loss"] if "loss" in e else str(e.get("metrics")) for e in trace.lines}
    return losses, trace.final
