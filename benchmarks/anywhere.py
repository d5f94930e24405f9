"""8. Signal → committed, wherever the signal lands (training step, long validation, sanity check, epoch end,
DataLoader worker start-up), next to the grace a preempted job gets.

Each location is one real run of the example job (``python -m preemptible.examples.train``) under the local
supervisor, 1 and 2 ranks, that sends itself SIGUSR1 at that exact place (``--signal-at``) and exits for the
requeue; the figure is the journal's own: the signal's ``received_at`` (first rank) to the checkpoint's commit,
or to the exit where nothing new had been trained (the sanity check). No second attempt is run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from common import ROOT, Context, Section, Table, child_env, secs

#: SLURM's GraceTime of the local cluster's preemptible partition (``low``): SIGTERM, then SIGKILL this much later.
GRACE_SECONDS = 20.0


def _locations(quick: bool) -> list[tuple[str, dict[str, Any], str]]:
    val_batches, val_sleep = (6, 0.2) if quick else (30, 1.0)
    val = {"val_every": 8, "val_batches": val_batches, "val_sleep": val_sleep}
    work = 0.5 if quick else 5.0
    return [
        ("training step (0.2 s steps)", {"step_sleep": 0.2}, "6"),
        (f"validation of {val_batches * val_sleep:.0f} s ({val_batches} × {val_sleep} s), at its 4th batch", val, "v8:3"),
        (f"sanity check ({val_sleep} s batches)", {**val, "sanity_steps": 2}, "sanity"),
        (f"epoch end ({work:.1f} s of on_train_epoch_end work)", {"epoch_end_sleep": work, "max_epochs": 2}, "e0:end"),
        ("epoch start, DataLoader workers starting (2 workers)", {"num_workers": 2}, "e1"),
    ]


def _measure(ctx: Context, name: str, world_size: int, options: dict[str, Any], point: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from preemptible.core.schema import Event, read_events
    from preemptible.examples.train import options_to_argv
    from preemptible.tools.testing import run_preempted

    work = ctx.scratch(name)
    options = {"max_steps": 40, "samples": 256 * world_size, **options}
    cmd = [sys.executable, "-m", "preemptible.examples.train", "--devices", str(world_size), "--signal-at", point,
           *options_to_argv(**options)]
    summary = run_preempted(cmd, run_dir=work / "run", timeout=300, max_restarts=0, log=work / "log.txt",
                            env={k: v for k, v in child_env().items() if k.startswith(("OMP_", "MKL_", "PL_", "PYTHON"))})
    events = list(read_events(work / "run" / "events.jsonl"))
    signals = [e["received_at"] for e in events if e["event"] == Event.SIGNAL and e.get("received_at")]
    committed = [e["time"] for e in events if e["event"] == Event.CHECKPOINT]
    exits = [e["time"] for e in events if e["event"] == Event.EXIT]
    stop = next((e for e in events if e["event"] == Event.STOP_AGREED), {})
    if not signals or not (committed or exits) or summary.attempts[0].exit_code != 144:
        raise RuntimeError(f"{name}: no stop after the signal (exit {summary.attempts[0].exit_code}):\n"
                           + (work / "log.txt").read_text(errors="replace")[-3000:])
    end = committed[0] if committed else min(exits)
    return {"latency": end - min(signals), "saved": bool(committed), "place": stop.get("place"), "batch": stop.get("batch"),
            "step": stop.get("step"), "save": next((e.get("seconds") for e in events if e["event"] == Event.CHECKPOINT), None)}


def run(ctx: Context) -> Section:
    section = Section("anywhere", "8. Signal → committed, wherever the signal lands", method=(
        "One run of the example job per location and world size; it signals itself (SIGUSR1) at the named place and "
        "exits for the requeue. Latency: from the signal's arrival (the handler's clock, first rank) to the "
        "checkpoint's commit, or to the exit where nothing had been trained yet (the sanity check). "
        f"Next to it: the {GRACE_SECONDS:.0f} s GraceTime of the local cluster's preemptible partition "
        "(SIGTERM, then SIGKILL). On main before this change, a stop waited for the validation to end: 11.25 s "
        "after the signal for a 12 s validation, so a 30 s validation could not be saved within 20 s."))
    table = Table("Signal → committed by location", ["location", "world size", "signal → committed (or exit)",
                                                      "÷ 20 s GraceTime", "stop taken at", "saved", "save itself"])
    data: dict[str, Any] = {}
    worlds = [1] if ctx.quick else [1, 2]
    for i, (label, options, point) in enumerate(_locations(ctx.quick)):
        for ws in worlds:
            ctx.log(f"anywhere: {label}, {ws} rank(s)")
            t0 = time.monotonic()
            m = _measure(ctx, f"anywhere-{i}-ws{ws}", ws, options, point)
            data[f"{i}-ws{ws}"] = m
            where = f"{m['place']} (step {m['step']}" + (f", batch {m['batch']})" if m["batch"] is not None else ")")
            table.add(label, ws, secs(m["latency"]), f"{m['latency'] / GRACE_SECONDS * 100:.0f} %", where,
                      "yes" if m["saved"] else "nothing new to save", secs(m["save"]))
            ctx.log(f"anywhere: {secs(m['latency'])} ({time.monotonic() - t0:.0f} s)")
    section.tables.append(table)
    worst = max(m["latency"] for m in data.values())
    section.findings.append(f"Worst location: {secs(worst)}, {worst / GRACE_SECONDS * 100:.0f} % of the {GRACE_SECONDS:.0f} s "
                            "GraceTime: the rest of the batch in progress (a validation batch, the first batch of an "
                            "epoch with its workers starting, the epoch-end work), plus the save, plus the agreement.")
    section.data = {"points": data, "line": f"Stop anywhere: signal → committed at most {secs(worst)} over the locations "
                                            f"measured (training, long validation, sanity check, epoch end, worker start-up), "
                                            f"against a {GRACE_SECONDS:.0f} s GraceTime."}
    return section
