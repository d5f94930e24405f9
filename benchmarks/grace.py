"""6. The grace window: the largest state this machine saves within 25 s.

SLURM's default KillWait is 30 s and GraceTime 0: after the SIGTERM of a preemption the job has 30 s
before SIGKILL. The emergency save must finish well inside that; 25 s leaves room for the step in
progress, the requeue call and the exit. The figure is extrapolated from the growth benchmark's
save times (signal → committed, linear in the size), never from a lone absolute time: the largest
state is the one whose predicted save time reaches 25 s. Nothing is launched here.
"""

from __future__ import annotations

from common import MB, Context, Section, Table, secs

WINDOW = 25.0


def _gb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def run(ctx: Context) -> Section:
    section = Section("grace", "6. The grace window (25 s of SLURM's default 30 s KillWait)", method=(
        "Extrapolated from the growth benchmark: a least-squares line through its signal → committed times "
        "(time = fixed + size ÷ rate) per world size, and, as a cautious second figure, the slowest throughput "
        "measured at 100 MB or more (else at the largest size measured) with no fixed cost. "
        "The largest state is where the line reaches 25 s. "
        "The stop itself waits for the step in progress (one process) or one more step (DDP: the agreement is read a "
        "step later): subtract up to one or two of your step times from the 25 s."))
    growth = ctx.sections.get("growth")
    if growth is None or growth.error or not growth.data.get("fits"):
        section.findings.append("Needs the growth benchmark in the same run (`--only growth,grace`).")
        return section
    ram_mb = _ram_mb()
    table = Table("Largest state saved within 25 s on this machine", [
        "world size", "fixed cost", "rate (fit)", "largest state (fit)", "slowest measured rate (≥ 100 MB)",
        "largest state at that rate"])
    best: dict[int, float] = {}
    for ws, fit in growth.data["fits"].items():
        a, b = fit["save_fixed"], fit["save_s_per_mb"]
        pts = [x for x in growth.data["points"] if x["ws"] == ws]
        big = [x for x in pts if x["bytes"] >= 100 * MB] or [max(pts, key=lambda x: x["bytes"])]
        slow = min(x["bytes"] / MB / x["save"] for x in big)
        fit_mb = (WINDOW - a) / b if b == b and b > 0 else float("nan")
        slow_mb = WINDOW * slow
        best[ws] = min(v for v in (fit_mb, slow_mb) if v == v)
        table.add(ws, secs(a), f"{1 / b:.0f} MB/s" if b == b and b > 0 else "n/a", _gb(fit_mb) if fit_mb == fit_mb else "n/a",
                  f"{slow:.0f} MB/s", _gb(slow_mb))
    section.tables.append(table)
    lowest = min(best.values())
    save = ctx.sections.get("save")
    lines = [
        f"On this machine an emergency save fits in 25 s up to about **{_gb(lowest)}** of checkpoint (the lower of the "
        "two estimates over world sizes 1 and 2)."
        + (f" That is more than this machine's RAM ({_gb(ram_mb)}): here, memory, not the save, bounds the state."
           if lowest > ram_mb else ""),
        "The extrapolation assumes the rate measured up to 1 GB holds further; page cache, a network filesystem or a "
        "disk shared with other jobs can lower it: measure on the cluster's checkpoint filesystem with "
        "`python benchmarks/run_all.py --only growth,grace --workdir <that filesystem>`.",
        "Beyond that size (or on slower storage): do not rely on the emergency save alone. Add periodic checkpoints "
        "(`PreemptionCallback(every_n_minutes=...)`, written on a background thread with `async_save=True`) so that a "
        "save cut short by SIGKILL loses at most one interval (the store never loads a torn file: the previous committed "
        "checkpoint is used); for the time limit, give the save its time (`sbatch --signal=USR1@<seconds>`, and "
        "`deadline=True` stops by itself when the time left no longer fits the last measured save); for preemption, ask "
        "for a partition `GraceTime`; and write checkpoints to the fastest filesystem available.",
    ]
    if save is not None and not save.error and save.data:
        d = save.data
        lines.append(f"For comparison, Lightning's `save_checkpoint` ran at {d['lightning_vs_raw']:.2f}× the raw time and "
                     "needs a second copy of the whole checkpoint in memory while it writes.")
    section.findings += lines
    section.data = {"largest_mb": best, "line": f"Grace window: up to about {_gb(lowest)} of state is saved within 25 s "
                                                  "on this machine (extrapolated from the growth curve)."}
    return section


def _ram_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")
