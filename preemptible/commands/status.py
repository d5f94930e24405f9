"""``preemptible status RUN_DIR``: the run's state, checkpoints, attempts and losses, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from preemptible.core.exit import CANCELLED_EXIT_CODE, REQUEUE_EXIT_CODE
from preemptible.tools.runinfo import DEFAULT_STALE_AFTER, RunInfo, format_duration, summarize

EXAMPLES = f"""
examples:
  preemptible status runs/exp1                  # state, last committed step, checkpoints, attempts
  preemptible status runs/exp1 --verify         # also check every checkpoint's checksum (reads them all)
  preemptible status runs/exp1 --json | jq .state

  # every run under runs/ that is not finished
  for d in runs/*/; do preemptible status "$d" --json | jq -r 'select(.state != "finished") | .run_dir + " " + .state'; done

States: running (the job's process is alive, or on another host wrote something in the last
{DEFAULT_STALE_AFTER:.0f} s), preempted (stopped, checkpointed, waiting to be restarted), finished, failed
(crashed, killed, requeue limit reached or requeue failed), unknown (another host, silent for longer).
Safe while the job runs: nothing in RUN_DIR is written or moved. See 'preemptible report' for goodput.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="show a run's state, checkpoints, attempts and lost work",
                       description="Summarise a run directory: state, last committed step, checkpoints "
                                   "(step, size, age, valid), attempts, preemptions, steps and time lost.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (PreemptionCallback's run_dir)")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of tables (for scripts)")
    p.add_argument("--verify", action="store_true", help="verify checkpoints' checksums, not only their sizes")
    p.add_argument("--stale-after", type=float, default=DEFAULT_STALE_AFTER, metavar="SECONDS",
                   help=f"a job on another host that wrote nothing for this long is 'unknown' "
                        f"(default {DEFAULT_STALE_AFTER:.0f})")
    p.set_defaults(func=status_command)


def status_command(args: argparse.Namespace) -> int:
    info = summarize(args.run_dir, checksum=args.verify, stale_after=args.stale_after)
    if args.json:
        # Plain stdout, not rich: a JSON document must not be wrapped or coloured.
        json.dump(info.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console

    console = Console()
    for table in (summary_table(info), checkpoints_table(info), attempts_table(info)):
        console.print(table)
    return 0


_STATE_STYLE = {"running": "bold cyan", "preempted": "bold yellow", "cancelled": "bold yellow", "finished": "bold green",
                "failed": "bold red", "unknown": "bold magenta"}


def summary_table(info: RunInfo) -> Any:
    from rich.table import Table

    table = Table(title=f"preemptible status: {info.run_dir}", title_justify="left", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    style = _STATE_STYLE.get(info.state, "bold")
    g = info.goodput
    rows = [
        ("state", f"[{style}]{info.state}[/] — {info.state_detail}"),
        ("current step", _fmt(info.current_step)),
        ("last committed step", _fmt(info.last_committed_step) + ("" if info.last_committed_step is not None
                                                                  else " (no valid checkpoint)")),
        ("attempts", str(len(info.attempts))),
        ("preemptions", str(info.preemptions) + (f" ({len(info.interruptions) - info.preemptions} other interruptions)"
                                                  if len(info.interruptions) > info.preemptions else "")),
        ("requeues (run.json)", _fmt(info.requeues) + (f", {info.record['crash_requeues']} after a crash"
                                                       if info.record.get("crash_requeues") else "")),
        ("steps lost", str(info.steps_lost)),
        ("time lost", format_duration(info.time_lost_seconds)),
        ("goodput", "-" if g.goodput is None else f"{g.goodput:.1%} of {format_duration(g.wall_seconds)} wall time"),
    ]
    if info.quarantined:
        rows.append(("quarantined", f"{info.quarantined} checkpoint(s) in checkpoints/quarantine/"))
    for failed in info.failed_saves:
        rows.append(("[red]failed save[/]", f"step {_fmt(failed.step)} ({failed.reason or 'checkpoint'}), "
                                            f"{format_duration(info.generated_at - failed.time)} ago: {failed.error} "
                                            "(the earlier checkpoints are intact)"))
    for what, value in rows:
        table.add_row(what, value)
    return table


def checkpoints_table(info: RunInfo) -> Any:
    from rich.table import Table

    check = "checksum" if any(c.checksum for c in info.checkpoints) else "size; --verify for the checksum"
    table = Table(title=f"checkpoints ({check})", title_justify="left")
    for col, justify in (("step", "right"), ("size", "right"), ("age", "right"), ("reason", "left"), ("valid", "left"),
                         ("file", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in reversed(info.checkpoints):
        valid = "[green]yes[/]" if c.valid else f"[red]NO[/]: {c.problem}"
        table.add_row(str(c.step), format_bytes(c.bytes), format_duration(c.age_seconds), c.reason or "-", valid,
                      c.path.rsplit("/", 1)[-1])
    if not info.checkpoints:
        table.add_row("-", "-", "-", "-", "-", "none committed yet")
    return table


def attempts_table(info: RunInfo) -> Any:
    from rich.table import Table

    table = Table(title="attempts", title_justify="left")
    for col in ("#", "job/restart", "host (pid)", "started", "resumed at", "ended at", "outcome", "training", "startup",
                "steps lost"):
        table.add_column(col, justify="left" if col in ("job/restart", "host (pid)", "started", "outcome") else "right")
    for a in info.attempts:
        why = ", ".join(w for w in (a.stop_cause, a.stop_reason or a.signal) if w)
        unusual_exit = a.exit_code not in (None, REQUEUE_EXIT_CODE, CANCELLED_EXIT_CODE, 0)
        outcome = a.outcome + (f" ({why})" if why else "") + (f", exit {a.exit_code}" if unusual_exit else "")
        table.add_row(str(a.index), f"{a.job_id or 'local'}/{a.restart_count}", f"{a.host} ({_fmt(a.pid)})",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.started_at)),
                      _fmt(a.resumed_from_step), _fmt(a.end_step), outcome, format_duration(a.training_seconds),
                      format_duration(a.startup_seconds), str(a.steps_lost))
    return table


def format_bytes(n: int) -> str:
    if n < 0:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} TiB"


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)
