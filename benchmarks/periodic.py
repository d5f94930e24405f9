"""7. Periodic checkpoints: how much training time each one costs, in the background and not.

Arms, interleaved by repetition (one process per repetition runs every arm in that repetition's
order, each with a fresh model and Trainer; the same steps, the same checkpoint steps):

* ``none``: ``PreemptionCallback`` without periodic checkpoints (the reference);
* ``background``: ``PreemptionCallback(every_n_steps=K)`` with ``async_save=True`` (the default): rank 0
  copies the state to CPU memory at the step, a thread writes it through the store while training goes on;
* ``synchronous``: the same with ``async_save=False``: training waits for the committed checkpoint;
* ``lightning``: Lightning's ``ModelCheckpoint(every_n_train_steps=K)`` (what users otherwise use),
  with the callback present but not checkpointing, so that only the way of checkpointing differs.

*Cost per checkpoint* = (training time of the arm − that of ``none`` in the same repetition) ÷ the
number of checkpoints. The training time runs from the end of the first step to the end of the last
(so a background write still in flight at the end is waited for, in teardown, after it: it is
counted by the *committed* column, not hidden).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any

from common import Context, Section, Table, interleaved_order, median, read_spec, require, run_worker, secs, spread, write_result

from preemptible.core.schema import JOURNAL_FILE, Event, read_events

ARMS = ["none", "background", "synchronous", "lightning"]


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"mb": 8, "reps": 1, "every": 4, "checkpoints": 2, "step_sleep": 0.01}
    return {"mb": 320, "reps": 4, "every": 25, "checkpoints": 4, "step_sleep": 0.02}


def run(ctx: Context) -> Section:
    p = plan(ctx.quick)
    steps = p["every"] * (p["checkpoints"] + 1) - 1  # the last checkpoint has K-1 steps after it to land
    section = Section("periodic", "7. Periodic checkpoints: training time lost per checkpoint", method=(
        f"Model: the tiny network plus {p['mb']} MB of frozen weights, one process, a step of about "
        f"{p['step_sleep'] * 1e3:.0f} ms (the model sleeps in each step, as a host thread waits for an accelerator), "
        f"{steps} steps with a checkpoint every {p['every']} ({p['checkpoints']} checkpoints). Arms interleaved over "
        f"{p['reps']} repetitions (one process each, a fresh model and Trainer per arm): *none* = `PreemptionCallback` "
        "without periodic checkpoints; *background* = `every_n_steps` with `async_save=True` (the state is copied to CPU "
        "memory at the step and written by a thread through the atomic store); *synchronous* = the same with "
        "`async_save=False`; *Lightning* = `ModelCheckpoint(every_n_train_steps=...)`. *Cost per checkpoint* = (the "
        "arm's training time − *none*'s in the same repetition) ÷ checkpoints, median over repetitions; training time "
        "runs from the end of the first step to the end of the last."))
    reps: list[dict[str, Any]] = []
    for rep in range(p["reps"]):
        order = interleaved_order(ARMS, rep)
        ctx.log(f"periodic: repetition {rep + 1}/{p['reps']}, order {order}")
        res = require(run_worker("periodic", dict(p, steps=steps, arms=order, dir=str(ctx.scratch(f"periodic-{rep}"))),
                                 ctx.workdir / f"periodic-{rep}.json", timeout=900), "periodic worker")
        reps.append(res["arms"])

    n = p["checkpoints"]
    table = Table(f"Training time lost per periodic checkpoint of {reps[0]['background']['bytes'] / (1 << 20):.0f} MB "
                  f"({len(reps)} repetitions)",
                  ["arm", "training time (median)", "cost per checkpoint [range]", "÷ one synchronous save",
                   "longest step", "committed"])
    per_ckpt: dict[str, list[float]] = {}
    for arm in ARMS:
        per_ckpt[arm] = [(r[arm]["train_seconds"] - r["none"]["train_seconds"]) / n for r in reps]
    sync_cost = median(per_ckpt["synchronous"])
    for arm in ARMS:
        cost = per_ckpt[arm]
        lo, hi = spread(cost)
        table.add(arm, secs(median([r[arm]["train_seconds"] for r in reps])),
                  "" if arm == "none" else f"{secs(median(cost))} [{secs(lo)}, {secs(hi)}]",
                  "" if arm == "none" or sync_cost <= 0 else f"{median(cost) / sync_cost * 100:.0f} %",
                  secs(median([r[arm]["longest_step"] for r in reps])),
                  "" if arm == "none" else f"{median([r[arm]['committed'] for r in reps]):.0f} of {n}")
    section.tables.append(table)
    bg, lt = median(per_ckpt["background"]), median(per_ckpt["lightning"])
    copy = median([r["background"].get("copy_seconds") or 0.0 for r in reps])
    section.findings += [
        f"A background checkpoint costs training {secs(bg)} (median), against {secs(sync_cost)} for the same checkpoint "
        f"written synchronously and {secs(lt)} for Lightning's `ModelCheckpoint`"
        + (f": {bg / sync_cost * 100:.0f} % of a synchronous save." if sync_cost > 0 else "."),
        f"What the background save still costs is mostly the copy of the state into CPU memory at the step (about "
        f"{secs(copy)} here, from the journal), plus the writer thread's share of the CPU while it runs; the copy keeps "
        "the checkpoint consistent while the optimizer goes on changing the weights. Its buffers are kept and reused from one "
        "save to the next (one checkpoint's worth of CPU memory): copying into memory already touched is about twice as "
        "fast as into new pages.",
    ]
    section.data = {"background": bg, "synchronous": sync_cost, "lightning": lt,
                    "line": f"Periodic checkpoints ({reps[0]['background']['bytes'] / (1 << 20):.0f} MB): {secs(bg)} of "
                            f"training time each in the background, {secs(sync_cost)} synchronous, {secs(lt)} with "
                            "Lightning's ModelCheckpoint."}
    return section


# ---------------------------------------------------------------------------------------------------
# Worker: one process, the given arms in order
# ---------------------------------------------------------------------------------------------------
def worker(spec: dict[str, Any]) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from workers import BallastModel, StepTimer, blobs, setup_process, trainer_kwargs

    from preemptible import PreemptionCallback

    setup_process()
    out: dict[str, Any] = {}
    work = Path(spec["dir"])
    every, steps = int(spec["every"]), int(spec["steps"])
    for arm in spec["arms"]:
        pl.seed_everything(1234, verbose=False)
        run_dir = work / f"run-{arm}"
        timer = StepTimer(0)
        periodic = {"every_n_steps": every, "async_save": arm == "background"} if arm in ("background", "synchronous") else {}
        callbacks: list[Any] = [PreemptionCallback(run_dir=run_dir, requeue="none", save_on_finish=False, keep=10, **periodic),
                                timer]
        kwargs = trainer_kwargs(1, steps)
        if arm == "lightning":
            callbacks.append(ModelCheckpoint(dirpath=work / "lightning", every_n_train_steps=every, save_top_k=-1))
            kwargs["enable_checkpointing"] = True
        trainer = pl.Trainer(callbacks=callbacks, **kwargs)
        trainer.fit(BallastModel(spec["mb"], step_sleep=spec["step_sleep"]), datamodule=blobs(steps, 1))
        durations = [b - a for a, b in zip(timer.times, timer.times[1:])]
        events = [e for e in read_events(run_dir / JOURNAL_FILE) if e.get("event") == Event.CHECKPOINT]
        copies = [e["copy_seconds"] for e in events if e.get("copy_seconds") is not None]
        lightning_files = sorted((work / "lightning").glob("*.ckpt")) if arm == "lightning" else []
        out[arm] = {
            "train_seconds": timer.times[-1] - timer.times[0],
            "longest_step": max(durations),
            "committed": len(events) if arm != "lightning" else len(lightning_files),
            "bytes": events[-1]["bytes"] if events else (lightning_files[-1].stat().st_size if lightning_files else 0),
            "copy_seconds": median(copies) if copies else None,
        }
        for f in list(run_dir.glob("checkpoints/step-*")) + lightning_files:
            f.unlink()
        del trainer
        gc.collect()
        time.sleep(0.5)  # let the page cache's writeback of this arm's files settle before the next arm
    write_result(spec, {"arms": out})


if __name__ == "__main__":
    worker(read_spec(sys.argv))
