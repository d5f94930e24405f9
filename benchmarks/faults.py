#!/usr/bin/env python
"""Fault-injection campaigns for preemptible: ``make faults`` -> a table on stdout and ``benchmarks/FAULTS.md``.

Every campaign injects a real fault into a real process and then plays "the next start": it checks,
independently of the store's own bookkeeping, that the run resumes from the newest *complete*
checkpoint, that no partial or damaged file is ever handed out, that no committed checkpoint is
lost, that nothing hangs, and that a fault the library cannot repair ends with a clear error.

Campaigns (``--only`` takes these names):

* ``store-kill``: a child process commits 24 MiB checkpoints in a loop through ``CheckpointStore``
  and is SIGKILLed at a random moment (or when its temp file reaches a random size).
* ``lightning-kill``: the example training with a 16 MiB checkpoint gets a preemption signal and is
  SIGKILLed 0-250 ms later (or the moment its temp file / commit record appears).
* ``periodic-kill``: SIGKILL without warning while background periodic checkpoints are written.
* ``damage``: committed checkpoints are truncated, bit-flipped, emptied, overwritten with random
  bytes, or their commit record is damaged or removed.
* ``disk-full``: a write fails with EFBIG (``RLIMIT_FSIZE`` in a child process, SIGXFSZ ignored) or
  ENOSPC (a small tmpfs, when ``mount -t tmpfs`` works here) at the store; ``lightning-disk-full``:
  the same in a real emergency save.
* ``storm``: 100+ mixed signals through the save and the exit; ``term-during-save``: SIGTERM while the
  checkpoint is written; ``early-second``: a second preemption right after a resume; ``teardown``:
  SIGTERM after the last step, then a restart. ``peer-crash`` (``faults_peers.py``): a rank of a 2-rank DDP
  run SIGKILLed or frozen without warning; the job must end within the peer watchdog's bound, with the crash code.

Usage::

    python benchmarks/faults.py                 # default trial counts (about 12 minutes on 2 cores)
    python benchmarks/faults.py --quick         # a smoke run
    python benchmarks/faults.py --trials 300    # scale every campaign
    python benchmarks/faults.py --only damage,store-kill

This file holds the campaigns (how many trials of which fault), the report and the CLI. The harness
they run — child processes (``python -m preemptible.tools.faults.children``), the driver of an
attempt, the oracle, the fault scripts and the trial runners — is :mod:`preemptible.tools.faults`,
shared with ``tests/test_faults.py``.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from preemptible.core.schema import CHECKPOINT_DIR, Event  # noqa: E402
from preemptible.tools.faults import (  # noqa: E402
    MiB,
    Tally,
    damage_trials,
    fault_early_second,
    fault_kill_after_signal,
    fault_kill_during_training,
    fault_kill_when,
    fault_plain_preemption,
    fault_storm,
    fault_term_during_save,
    fill_until_free,
    fsize_limit,
    inventory,
    lightning_chain,
    load_losses,
    rlimit_store_trials,
    run_attempt,
    store_kill_trials,
    tmpfs,
    tmpfs_store_trials,
    train_command,
)


# =====================================================================================================
# Campaigns that are not a plain trial runner
# =====================================================================================================
def teardown_trials(workdir: Path, points: Sequence[str] = ("train_end", "fit_end", "teardown")) -> Tally:
    """SIGTERM after the last step, at each point of the way out of ``trainer.fit``; then a restart.

    Until preemptible's own teardown the signal is preemptible's: the finished run records it and ends
    cleanly (exit 0). At ``teardown`` (after preemptible handed the signal handlers back, as ``trainer.fit``
    returns to the user's code) SIGTERM takes the process's own disposition: with none set, death by the
    signal (exit -15), which is the truth about that process and what a script after ``fit`` must get.
    Either way the final checkpoint stays intact and the restart does nothing: resume at the end, train no step.
    """
    tally = Tally("SIGTERM after the last step (on_train_end / on_fit_end / teardown), then a restart")
    started = time.monotonic()
    for point in points:
        d = _mk(workdir / point)
        first = run_attempt(train_command(d / "record-0.jsonl", max_steps=6, self_signal=[f"{point}:TERM"]),
                            d / "run", 0, log=d / "attempt-0.log")
        tally.trials += 1
        tally.injected += f"self-signal SIGTERM at {point}" in first.output
        inv = inventory(d / "run" / CHECKPOINT_DIR, loadable=True)
        tally.moments[f"{point}: exit {first.exit_code}"] += 1
        expected = -signal.SIGTERM if point == "teardown" else 0  # see the docstring: handlers handed back
        if first.exit_code != expected:
            tally.problem(f"{point}: the finished run ended with exit code {first.exit_code} instead of {expected}")
        if inv.broken or inv.temps or inv.newest_intact_step != 6:
            tally.problem(f"{point}: checkpoints after the signal: intact {inv.intact}, broken {inv.broken}, temps {inv.temps}")
        again = run_attempt(train_command(d / "record-1.jsonl", max_steps=6), d / "run", 1, log=d / "attempt-1.log")
        trained = [k for k in load_losses(d / "record-1.jsonl")[0] if k[0] == "train"]
        events = [e["event"] for e in again.events]
        if again.timed_out:
            tally.hang += 1
        elif again.exit_code == 0 and not trained and Event.TRAIN_START not in events and Event.FINISH in events:
            tally.resumed_newest += 1
        else:
            tally.lost += 1
            tally.problem(f"{point}: the restart exited {again.exit_code}, trained {len(trained)} step(s), events {events}")
    tally.notes.append("a restart of the finished run resumes its final checkpoint and trains nothing")
    tally.notes.append("on_train_end / on_fit_end: preemptible records the signal and the finished run exits 0; "
                       "teardown: the handlers are the user's again, so SIGTERM's default action ends the process (-15)")
    tally.seconds = time.monotonic() - started
    return tally


def reference_run(workdir: Path, max_steps: int, ballast_mb: float) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "record.jsonl"
    record.unlink(missing_ok=True)
    res = run_attempt(train_command(record, max_steps=max_steps, ballast_mb=ballast_mb), workdir / "run", 0,
                      log=workdir / "log.txt")
    if res.exit_code != 0:
        raise RuntimeError(f"the reference run failed ({res.exit_code}): {res.output[-2000:]}")
    return record


def campaign(args: argparse.Namespace) -> list[Tally]:
    n = args.trials
    quick = args.quick
    only = set(args.only.split(",")) if args.only else None
    counts = {
        "store-kill": n,
        "damage": 2 * n,
        "disk-full": max(4, n // 4),
        "lightning-kill": max(2, n // 15),
        "periodic-kill": max(2, n // 15),
        "lightning-disk-full": max(1, n // 50),
        "storm": max(1, n // 50),
        "term-during-save": max(1, n // 50),
        "early-second": max(2, n // 40),
        "peer-crash": max(4, n // 20),
    }

    def want(name: str) -> bool:
        return only is None or name in only or name.split("-")[0] in only

    tallies: list[Tally] = []
    root = Path(tempfile.mkdtemp(prefix="preemptible-faults-"))

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        if want("store-kill"):
            say(f"store-kill: {counts['store-kill']} trials ...")
            tallies.append(store_kill_trials(root, counts["store-kill"]))
        if want("damage"):
            say(f"damage: {counts['damage']} trials ...")
            tallies.append(damage_trials(root, counts["damage"]))
        if want("disk-full"):
            say(f"disk-full: {counts['disk-full']} trials each ...")
            tallies.append(rlimit_store_trials(root, counts["disk-full"]))
            t = tmpfs_store_trials(root, counts["disk-full"])
            if t is not None:
                tallies.append(t)
            else:
                say("  (tmpfs cannot be mounted here: ENOSPC campaign skipped)")
        if want("peer-crash"):
            from faults_peers import peer_crash_trials

            say(f"peer-crash: {counts['peer-crash']} trials ...")
            tallies.append(peer_crash_trials(_mk(root / "peers"), counts["peer-crash"]))
        lightning = [k for k in ("lightning-kill", "periodic-kill", "lightning-disk-full", "storm", "term-during-save",
                                 "early-second", "teardown") if want(k)]
        if set(lightning) - {"teardown"}:
            # Each trial uses up to ~8 steps past its resume point; the final attempt trains to the end.
            longest = max(counts[k] for k in ("lightning-kill", "periodic-kill", "storm", "term-during-save", "early-second"))
            max_steps = 40 if quick else max(90, 9 * longest + 10)
            say(f"reference run ({max_steps} steps) ...")
            ref = reference_run(root / "reference", max_steps, 16)
        if "lightning-kill" in lightning:
            k = counts["lightning-kill"]
            say(f"lightning-kill: {k} trials ...")
            t = Tally("SIGKILL 0-250 ms after the preemption signal (Lightning emergency save, 16 MiB checkpoint)")
            faults = ([fault_plain_preemption()] + [fault_kill_after_signal(0.25) for _ in range(max(0, k - 2))]
                      + [fault_kill_when("temp"), fault_kill_when("record")])
            lightning_chain(t, _mk(root / "lightning-kill"), faults, max_steps=max_steps, ballast_mb=16, expect_exit=-9,
                            reference=ref, scene=1)
            tallies.append(t)
        if "periodic-kill" in lightning:
            k = counts["periodic-kill"]
            say(f"periodic-kill: {k} trials ...")
            t = Tally("SIGKILL without warning during training with background checkpoints every 3 steps (16 MiB)")
            lightning_chain(t, _mk(root / "periodic-kill"), [fault_kill_during_training() for _ in range(k)],
                            max_steps=max_steps, ballast_mb=16, expect_exit=-9, reference=ref,
                            options={"every_n_steps": 3})
            tallies.append(t)
        if "lightning-disk-full" in lightning:
            k = counts["lightning-disk-full"]
            say(f"lightning-disk-full: {k} trials each ...")
            t = Tally("write error: EFBIG (RLIMIT_FSIZE 1 MiB) in the Lightning emergency save (4 MiB checkpoint)")
            faults = [fault_plain_preemption() for _ in range(k + 1)]
            lightning_chain(t, _mk(root / "lightning-rlimit"), faults, max_steps=max_steps, ballast_mb=4, expect_exit=1,
                            reference=ref, scene=1, preexec=fsize_limit(MiB),
                            error_text=("CheckpointError", "File too large", "step-0"))
            t.moments = collections.Counter({"EFBIG in the emergency save": t.trials})
            tallies.append(t)
            t = lightning_tmpfs_disk_full(_mk(root / "lightning-tmpfs"), k, max_steps, ref)
            if t is not None:
                tallies.append(t)
        if "storm" in lightning:
            k = counts["storm"]
            say(f"storm: {k} trials ...")
            t = Tally("storm of 100+ signals (USR1/TERM/USR2) from a random step through the save and the exit")
            lightning_chain(t, _mk(root / "storm"), [fault_storm() for _ in range(k)], max_steps=max_steps, ballast_mb=16,
                            expect_exit=144, reference=ref)
            tallies.append(t)
        if "term-during-save" in lightning:
            k = counts["term-during-save"]
            say(f"term-during-save: {k} trials ...")
            t = Tally("SIGTERM during the emergency save (while writing, and after the commit)")
            lightning_chain(t, _mk(root / "term"), [fault_term_during_save() for _ in range(k)], max_steps=max_steps,
                            ballast_mb=16, expect_exit=144, reference=ref)
            tallies.append(t)
        if "teardown" in lightning:
            say("teardown: 3 trials ...")
            tallies.append(teardown_trials(_mk(root / "teardown")))
        if "early-second" in lightning:
            k = counts["early-second"]
            say(f"early-second: {k} trials ...")
            t = Tally("second preemption in the resumed run's first moments (during set-up, or after step 1)")
            variants = ["before-first-step" if i % 2 == 0 else "after-first-step" for i in range(k)]
            lightning_chain(t, _mk(root / "early"), [fault_early_second("first")] + [fault_early_second(v) for v in variants],
                            max_steps=max_steps, ballast_mb=16, expect_exit=144, reference=ref, scene=1)
            tallies.append(t)
    finally:
        if args.keep_workdir:
            say(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return tallies


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def lightning_tmpfs_disk_full(workdir: Path, trials: int, max_steps: int, reference: Path) -> Optional[Tally]:
    """The run directory on a 48 MiB tmpfs; before each faulted attempt the free space is cut below one checkpoint."""
    tally = Tally("disk full: ENOSPC on a small tmpfs in the Lightning emergency save (4 MiB checkpoint)")
    with tmpfs(48 * MiB) as mnt:
        if mnt is None:
            return None
        rng = random.Random(11)

        def between(k: int) -> None:
            (mnt / "filler").unlink(missing_ok=True)
            if 1 <= k <= trials:
                # Room for the journal and the small files, not for a ~4 MiB checkpoint: 1 to 3 MiB free.
                fill_until_free(mnt, rng.randint(1 * MiB, 3 * MiB))

        faults = [fault_plain_preemption() for _ in range(trials + 1)]
        lightning_chain(tally, workdir, faults, max_steps=max_steps, ballast_mb=4, expect_exit=1, reference=reference,
                        scene=1, run_dir=mnt / "run", between=between,
                        error_text=("CheckpointError", "No space left on device", "step-0"))
    tally.moments = collections.Counter({"ENOSPC in the emergency save": tally.trials})
    return tally


# =====================================================================================================
# The report
# =====================================================================================================
COLUMNS = ["fault", "trials", "faults injected", "resumed from newest complete", "partial file loaded",
           "committed checkpoint lost", "hang", "clear error", "other problems"]


def table_rows(tallies: Sequence[Tally]) -> list[list[str]]:
    return [[t.fault, str(t.trials), str(t.injected), str(t.resumed_newest), str(t.partial_loaded), str(t.lost),
             str(t.hang), str(t.clear_error), str(len(t.problems))] for t in tallies]


def render_text(tallies: Sequence[Tally]) -> str:
    rows = [COLUMNS] + table_rows(tallies)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(tallies: Sequence[Tally]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(tallies)]
    return "\n".join(lines)


def moments_text(t: Tally) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(t.moments.items(), key=lambda kv: -kv[1]))


def grouped_problems(tallies: Sequence[Tally]) -> list[tuple[str, str]]:
    """One line per distinct problem of a campaign, with the trials or attempts it happened in."""
    out = []
    for t in tallies:
        groups: dict[str, list[str]] = {}
        for p in t.problems:
            m = re.match(r"^(trial|attempt) (\d+): (.*)$", p, re.S)
            key, where = (m.group(3), f"{m.group(1)} {m.group(2)}") if m else (p, "")
            if m:  # the same problem in another trial differs only in step numbers and paths
                key = re.sub(r"(step[ -])\d+", r"\1N", key)
                key = re.sub(r"/\S*/(step-N\.ckpt)", r".../\1", key)
            groups.setdefault(key, []).append(where)
        for key, where in groups.items():
            seen = [w for w in where if w]
            out.append((t.fault, f"{key} ({len(seen)}x: {', '.join(seen)})" if seen else key))
    return out


def write_report(tallies: Sequence[Tally], args: argparse.Namespace, seconds: float, path: Path) -> None:
    import torch

    try:
        import pytorch_lightning as pl

        plv = pl.__version__
    except ImportError:
        plv = "?"
    lines = [
        "# Fault-injection campaign",
        "",
        f"Written by `make faults` (`python benchmarks/faults.py{' --quick' if args.quick else ''} --trials {args.trials}`) "
        f"on {time.strftime('%Y-%m-%d')}: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, pytorch-lightning {plv}; "
        f"{seconds / 60:.1f} minutes.",
        "",
        render_markdown(tallies),
        "",
        "Columns: *resumed from newest complete* — the next start used the newest checkpoint whose bytes match "
        "its commit record (recomputed by the campaign from the file, not taken from the store); "
        "*partial file loaded* — the next start used anything else (must be 0); *committed checkpoint lost* — a "
        "committed checkpoint that retention keeps disappeared or went bad, or an older one was used (must be 0); "
        "*hang* — a process or a wait exceeded its bound (must be 0); *clear error* — the fault ended the process with "
        "an error naming the file and the cause (disk full), or a damaged checkpoint was reported by name and moved "
        "to `quarantine/`; *other problems* — anything unexpected, listed below (must be 0).",
        "",
        "## Where the faults landed",
        "",
    ]
    for t in tallies:
        lines.append(f"* **{t.fault}** ({t.seconds:.0f} s): {moments_text(t) or '-'}")
        for note in t.notes:
            lines.append(f"  * {note}")
    lines += ["", "## Problems", ""]
    lines += [f"* {fault}: {p}" for fault, p in grouped_problems(tallies)] or ["None."]
    lines += [
        "",
        "## What this does not show",
        "",
        "SIGKILL stops a process, not the machine: data already handed to the kernel survives it, so these trials "
        "check the ordering of write, rename and commit record, not that `fsync` reaches the disk before a power "
        "loss. Network filesystems (NFS, Lustre) are not exercised here.",
        "",
    ]
    # The cluster-jobs section (benchmarks/cluster_jobs.py) is written by its own run: keep it.
    old = path.read_text() if path.exists() else ""
    begin, end = "<!-- cluster-jobs:begin -->", "<!-- cluster-jobs:end -->"
    if begin in old and end in old:
        lines += [begin + old.split(begin, 1)[1].split(end, 1)[0] + end, ""]
    path.write_text("\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=None, help="SIGKILL trials at the store (others scale with it); default 150")
    p.add_argument("--quick", action="store_true", help="a smoke run: few trials of each kind")
    p.add_argument("--only", default=None, help="comma-separated campaigns: store-kill, damage, disk-full, lightning-kill, "
                   "periodic-kill, lightning-disk-full, storm, term-during-save, early-second, teardown, peer-crash")
    p.add_argument("--out", type=Path, default=SCRIPT.parent / "FAULTS.md")
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if args.trials is None:
        args.trials = 20 if args.quick else 150
    started = time.monotonic()
    tallies = campaign(args)
    seconds = time.monotonic() - started
    print()
    print(render_text(tallies))
    for t in tallies:
        print(f"* {t.fault} ({t.seconds:.0f} s): {moments_text(t)}")
    for t in tallies:
        for problem in t.problems:
            print(f"PROBLEM [{t.fault}]: {problem}")
    if args.out and not args.only:
        write_report(tallies, args, seconds, args.out)
        print(f"\nwritten: {args.out}")
    return 0 if all(t.ok for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
