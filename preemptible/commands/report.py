"""``preemptible report RUN_DIR [-o timeline.png]``: goodput, where the rest of the time went, and a timeline."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from preemptible.tools.runinfo import AttemptInfo, RunInfo, format_duration, summarize, time_at_step

INSTALL_HINT = ("the timeline needs matplotlib, an optional extra: pip install 'preemptible[report]' "
                "(or pip install matplotlib)")

EXAMPLES = """
examples:
  preemptible report runs/exp1                    # goodput and its breakdown, cost of each interruption
  preemptible report runs/exp1 -o timeline.png    # and a PNG: global step against wall-clock time

Goodput = useful training time / wall time, from the first attempt's start to the last attempt's end.
The rest is split into redone work (steps trained again after an interruption), saving checkpoints,
startup and restarts (the process's own start, as the operating system recorded it, to the first step:
interpreter, imports, process group, loading), waiting in the queue (an attempt's end to the next
process's start: the scheduler and the launch) and other (stopping, requeue request, exit).
The timeline (-o) needs matplotlib: pip install 'preemptible[report]'.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="goodput of a run and a timeline of its preemptions (PNG)",
                       description="Print a run's goodput (useful training time / wall time) and where the rest "
                                   "went; with -o, draw global step against wall-clock time with preemptions, "
                                   "restarts and queue waits marked.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (PreemptionCallback's run_dir)")
    p.add_argument("-o", "--output", default=None, metavar="PNG", help="write the timeline to this PNG file")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.output is not None and not matplotlib_available():
        print(f"preemptible report: {INSTALL_HINT}", file=sys.stderr)
        return 2
    info = summarize(args.run_dir)
    console = Console()
    console.print(headline(info))
    console.print(goodput_table(info))
    if info.interruptions:
        console.print(interruptions_table(info))
    if args.output is not None:
        out = Path(args.output)
        write_timeline(info, out)
        console.print(f"timeline written to {out}")
    return 0


def headline(info: RunInfo) -> str:
    g = info.goodput
    if g.goodput is None:
        return f"[bold]{info.run_dir}[/]: no training time recorded yet ({info.state})"
    return (f"[bold]{info.run_dir}[/]: goodput [bold]{g.goodput:.1%}[/] — {format_duration(g.useful_seconds)} of useful "
            f"training in {format_duration(g.wall_seconds)} wall time, {len(info.attempts)} attempt(s), "
            f"state {info.state}")


def goodput_table(info: RunInfo) -> Any:
    from rich.table import Table

    g = info.goodput
    table = Table()
    table.add_column("where the wall time went")
    table.add_column("time", justify="right")
    table.add_column("share", justify="right")
    for name, seconds in g.components().items():
        share = f"{seconds / g.wall_seconds:.1%}" if g.wall_seconds > 0 else "-"
        table.add_row(name, format_duration(seconds), share)
    table.add_row("[bold]wall time[/]", f"[bold]{format_duration(g.wall_seconds)}[/]", "100%" if g.wall_seconds > 0 else "-")
    return table


def interruptions_table(info: RunInfo) -> Any:
    from rich.table import Table

    table = Table(title=f"interruptions: {info.preemptions} preemption(s), {info.steps_lost} step(s) and "
                        f"{format_duration(info.time_lost_seconds)} lost", title_justify="left")
    for col in ("attempt", "cause", "stopped at", "checkpoint", "resumed at", "steps lost", "redone", "stopping",
                "queue", "restart", "time lost"):
        table.add_column(col, justify="left" if col in ("cause",) else "right")
    for i in info.interruptions:
        why = ", ".join(w for w in (i.stop_cause, i.reason) if w)
        cause = i.cause + (f" ({why})" if why else "")
        table.add_row(str(i.attempt), cause, _fmt(i.stop_step), _fmt(i.checkpoint_step), _fmt(i.resumed_from_step),
                      str(i.steps_lost), format_duration(i.redone_seconds), format_duration(i.stopping_seconds),
                      format_duration(i.queue_seconds), format_duration(i.restart_seconds),
                      format_duration(i.time_lost_seconds))
    return table


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_timeline(info: RunInfo, out: Path) -> None:
    """Draw global step against wall-clock time: attempts, redone work, signals, restarts, queue waits."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc

    if not info.attempts:
        raise RuntimeError(f"{info.run_dir} has no journal (events.jsonl) to draw a timeline from")
    # A Figure on an explicit Agg canvas, not pyplot: no global state, no display needed on a login node.
    fig = Figure(figsize=(10, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    t0 = info.attempts[0].started_at
    scale, unit = _time_unit(info.goodput.wall_seconds)

    def x(t: float) -> float:
        return (t - t0) / scale

    labelled: set[str] = set()

    def once(label: str) -> Optional[str]:
        # Each kind of mark appears once in the legend, however many attempts have it.
        if label in labelled:
            return None
        labelled.add(label)
        return label

    colors = [f"C{i}" for i in (0, 2, 4, 5, 6, 8, 9)]  # C1/C3 (orange, red) are kept for restarts and losses
    many = len(info.attempts) > 8  # past a handful, one legend entry per attempt would bury the plot
    for i, a in enumerate(info.attempts):
        nxt = info.attempts[i + 1] if i + 1 < len(info.attempts) else None
        color = colors[a.index % len(colors)]
        label = once("training (one colour per attempt)") if many else f"attempt {a.index} ({a.outcome})"
        if a.train_started_at is not None:
            ax.axvspan(x(a.started_at), x(a.train_started_at), color="C1", alpha=0.25, lw=0,
                       label=once("startup / restart"))
        if a.points:
            _draw_progress(ax, a, x, color, label, once)
        if a.train_ended_at is not None and a.outcome not in ("finished", "running") and a.ended_at > a.train_ended_at:
            ax.axvspan(x(a.train_ended_at), x(a.ended_at), color="C4", alpha=0.3, lw=0, label=once("save, requeue, exit"))
        if a.signal_at is not None:
            ax.axvline(x(a.signal_at), color="C3", lw=1, ls=":", label=once("signal received"))
        if a.stop_step is not None and a.train_ended_at is not None:
            ax.plot([x(a.train_ended_at)], [a.stop_step], marker="X", color="C3", ms=9, ls="none",
                    label=once("agreed stop"))
        if nxt is not None:
            if nxt.started_at > a.ended_at:
                ax.axvspan(x(a.ended_at), x(nxt.started_at), color="0.6", alpha=0.3, lw=0, hatch="//",
                           label=once("queue wait + launch"))
            if nxt.train_started_at is not None and nxt.resumed_from_step is not None:
                ax.plot([x(nxt.train_started_at)], [nxt.resumed_from_step], marker="^", color="C1", ms=9, ls="none",
                        label=once("resumed"))
    g = info.goodput
    head = "" if g.goodput is None else f" — goodput {g.goodput:.0%}"
    ax.set_title(f"{_short(info.run_dir)}: {len(info.attempts)} attempt(s), {info.preemptions} preemption(s), "
                 f"{info.steps_lost} step(s) lost{head}", fontsize=11)
    ax.set_xlabel(f"wall-clock time since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t0))} ({unit})")
    ax.set_ylabel("global step")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # global steps are whole numbers
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")


def _draw_progress(ax: Any, a: AttemptInfo, x: Callable[[float], float], color: str, label: Optional[str],
                   once: Callable[[str], Optional[str]]) -> None:
    """The attempt's (time, step) line; the part whose steps were trained again later in red, dashed."""
    xs = [x(t) for t, _ in a.points]
    ys = [s for _, s in a.points]
    if a.steps_lost and a.end_step is not None:
        kept = a.end_step - a.steps_lost
        t_kept = time_at_step(a.points, kept)
        if t_kept is not None:
            keep_xs = [v for v, (t, _) in zip(xs, a.points) if t <= t_kept] + [x(t_kept)]
            keep_ys = [s for s, (t, _) in zip(ys, a.points) if t <= t_kept] + [kept]
            ax.plot(keep_xs, keep_ys, color=color, lw=2, label=label)
            lost_xs = [x(t_kept)] + [v for v, (t, _) in zip(xs, a.points) if t > t_kept]
            lost_ys = [kept] + [s for s, (t, _) in zip(ys, a.points) if t > t_kept]
            ax.plot(lost_xs, lost_ys, color="C3", lw=2, ls="--", label=once("lost steps (redone)"))
            return
    ax.plot(xs, ys, color=color, lw=2, marker="." if len(xs) < 60 else None, label=label)


def _short(path: str) -> str:
    """The run directory's last two components: enough to tell runs apart in a title."""
    parts = Path(path).parts
    return str(Path(*parts[-2:])) if len(parts) > 2 else path


def _time_unit(wall: float) -> tuple[float, str]:
    if wall < 180:
        return 1.0, "s"
    if wall < 3 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)
