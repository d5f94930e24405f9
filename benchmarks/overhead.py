"""1. Steady-state per-step overhead of ``PreemptionCallback`` (no signal) against a plain Trainer.

A tiny model, where any per-step cost shows most. One process, and two gloo DDP ranks. In each
process fresh Trainers run the arms in interleaved order (A B B A ...); the overhead is the median of
the per-repetition ratios. A stopwatch inside the callback's per-step hooks gives its own cost
directly, which the machine's noise cannot blur.
"""

from __future__ import annotations

import sys
from typing import Any

from common import Context, Section, Table, median, paired_ratios, pct, read_spec, require, run_worker, secs, spread, write_result


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"reps": 2, "steps": 30, "warmup": 5, "world_sizes": [1], "steps_ddp": 20, "reps_ddp": 2}
    return {"reps": 16, "steps": 300, "warmup": 20, "world_sizes": [1, 2], "steps_ddp": 100, "reps_ddp": 12}


def _cell(d: dict[str, Any]) -> str:
    return f"{pct(d['overhead'])} [{pct(d['range'][0])}, {pct(d['range'][1])}]"


def _verdict(median_steps: float, least_disturbed: float, cpu: float) -> str:
    met = [name for name, v in (("median steps", median_steps), ("least disturbed steps", least_disturbed),
                                ("CPU time", cpu)) if v <= 0.01]
    if len(met) == 3:
        return "meets the 1 % target on this tiny model by every measure"
    if not met:
        return "misses the 1 % target on this tiny model by every measure"
    return f"meets the 1 % target on this tiny model by {' and '.join(met)} only"


def run(ctx: Context) -> Section:
    p = plan(ctx.quick)
    section = Section("overhead", "1. Steady-state overhead per step (no signal)", method=(
        "Tiny model (`preemptible.examples.TinyModel`, batch 16, in-process data loading, CPU, one intra-op thread per "
        f"process), where any per-step cost shows most. Each process runs fresh Trainers per arm ({p['reps']} repetitions of "
        f"{p['steps']} timed steps for one process, {p['reps_ddp']} of {p['steps_ddp']} under DDP, after {p['warmup']} "
        "warm-up steps; short repetitions, so that neighbours in time share the machine's load), "
        "arms interleaved (A B C D, D C B A, ...). A repetition's figure is an order statistic of its step durations "
        "(see the table's note: stalls caused by other processes hit single steps); *overhead* = median over "
        "repetitions of (arm ÷ plain) − 1, with the range. "
        "Arms: *plain* Trainer; *empty callback* = plain + a `Callback` that does nothing (Lightning's "
        "per-hook dispatch, paid by any callback); *callback* = `PreemptionCallback`; *exact_data=False* = the callback "
        "without the per-batch bookkeeping of data position and RNG (done in the batch sampler, outside the hooks). "
        "*Hooks* = a stopwatch around the callback's own per-step hooks (median per step). "
        "Under DDP, Lightning 2.6 itself broadcasts its "
        "SIGTERM flag with a **blocking** collective on every step (`_TrainingEpochLoop._broadcast_sigterm_tensor`), in the "
        "*plain* and *empty callback* arms. `PreemptionCallback` owns SIGTERM on every rank during `fit` (Lightning's handler, "
        "the only thing that sets that flag, is replaced), so it reduces its own stop votes in that slot instead (the vote "
        "of one step boundary, read at the next): one collective per batch either way. Two more DDP arms: *agree every 10* "
        "= the callback with `agree_every_n_steps=10`, and *plain without Lightning's broadcast*, the floor against which "
        "the cost of a collective per batch shows."))
    table = Table("Per-step time against a plain Trainer (median [range] of per-repetition ratios; target ≤ 1 %)", [
        "world size", "step time", "plain / step", "empty callback", "PreemptionCallback", "PreemptionCallback, exact_data=False",
        "PreemptionCallback, agree every 10", "its hooks / step (÷ plain step)"])
    bcast = Table("Lightning's own per-batch SIGTERM broadcast under DDP (in the plain arm; the callback reduces its votes "
                  "in that slot instead)", [
        "step time", "plain / step", "plain without Lightning's broadcast / step", "what Lightning's broadcast costs [range]",
        "PreemptionCallback ÷ plain without Lightning's broadcast [range]"])
    for ws in p["world_sizes"]:
        arms = ["plain", "empty", "callback", "callback_noexact"] + (["callback_every10", "no_pl_broadcast"] if ws > 1 else [])
        ctx.log(f"overhead: world size {ws}, arms {arms}")
        spec = dict(p, arms=arms, devices=ws, run_root=str(ctx.scratch(f"overhead-ws{ws}")),
                    steps=p["steps"] if ws == 1 else p["steps_ddp"], reps=p["reps"] if ws == 1 else p["reps_ddp"])
        res = require(run_worker("overhead", spec, ctx.workdir / f"overhead-ws{ws}.json", world_size=ws, timeout=900),
                      f"overhead ws={ws}")
        hook = median(res["hook_seconds"]["callback"])
        for clock, key in (("median", "per_step"), ("lower decile", "per_step_low"), ("CPU time", "per_step_cpu")):
            ps = res[key]
            plain = median(ps["plain"])
            d: dict[str, Any] = {"plain": plain, "reps": len(ps["plain"]), "hook_seconds": hook, "hook_share": hook / plain}
            for arm in arms[1:]:
                r = paired_ratios(ps["plain"], ps[arm])
                d[arm] = {"per_step": median(ps[arm]), "overhead": median(r) - 1,
                          "range": [spread(r)[0] - 1, spread(r)[1] - 1]}
            d["overhead"] = d["callback"]["overhead"]
            table.add(ws, clock, secs(plain), _cell(d["empty"]), _cell(d["callback"]), _cell(d["callback_noexact"]),
                      _cell(d["callback_every10"]) if "callback_every10" in d else "(one process: no agreement)",
                      f"{secs(hook)} ({pct(d['hook_share'], 2)})" if clock == "median" else "")
            if ws > 1:
                r = paired_ratios(ps["no_pl_broadcast"], ps["plain"])
                own = paired_ratios(ps["no_pl_broadcast"], ps["callback"])
                bcast.add(clock, secs(plain), secs(median(ps["no_pl_broadcast"])),
                          f"{pct(median(r) - 1)} [{pct(spread(r)[0] - 1)}, {pct(spread(r)[1] - 1)}]",
                          f"{pct(median(own) - 1)} [{pct(spread(own)[0] - 1)}, {pct(spread(own)[1] - 1)}]")
                d["pl_broadcast"] = median(r) - 1
                d["own_vs_floor"] = median(own) - 1
            section.data[f"ws{ws}" + {"median": "", "lower decile": "_low", "CPU time": "_cpu"}[clock]] = d
    table.note = ("Step times of rank 0. *median*: each repetition's median wall-clock step. *lower decile*: each "
                  "repetition's 10th-percentile wall-clock step, the steps least disturbed by the other processes on this "
                  "shared machine. *CPU time*: each repetition's median CPU time of this process (all its threads) per "
                  "step; time other processes take from the cores does not count, though they still slow this one "
                  "through shared caches and hyper-threads (under DDP it leaves out waiting for the other rank).")
    section.tables.append(table)
    if bcast.rows:
        section.tables.append(bcast)
    _fabric_rows(ctx, p, section)
    for ws in p["world_sizes"]:
        d, dc, du = section.data[f"ws{ws}"], section.data[f"ws{ws}_low"], section.data[f"ws{ws}_cpu"]
        c, n, e = d["callback"], d["callback_noexact"], d["empty"]
        per_step = c["overhead"] * d["plain"]
        section.findings.append(
            f"World size {ws}: {pct(c['overhead'])} per {secs(d['plain'])} step with the callback (median steps), "
            f"{pct(dc['callback']['overhead'])} on the least disturbed steps, {pct(du['callback']['overhead'])} in CPU time "
            f"({_verdict(c['overhead'], dc['callback']['overhead'], du['callback']['overhead'])}). "
            f"For comparison, a do-nothing callback measures {pct(e['overhead'])} "
            f"({pct(dc['empty']['overhead'])} on the least disturbed steps): Lightning's per-hook dispatch, paid by any "
            f"callback. With `exact_data=False`: {pct(n['overhead'])} ({pct(dc['callback_noexact']['overhead'])}). "
            "The callback's own hooks take "
            f"{secs(d['hook_seconds'])} per step. In absolute terms about {secs(per_step)} per step, i.e. "
            f"{pct(per_step / 0.1, 2)} of a 100 ms training step.")
        if "pl_broadcast" in d:
            every10 = d["callback_every10"]
            section.findings.append(
                f"Lightning's blocking per-step SIGTERM broadcast (on vs off): {pct(d['pl_broadcast'])} per DDP step here "
                f"(median; {pct(dc['pl_broadcast'])} on the least disturbed steps). The callback reduces its votes in "
                f"that slot instead; against a Trainer with no collective there at all it measures {pct(d['own_vs_floor'])} "
                f"({pct(dc['own_vs_floor'])}). With `agree_every_n_steps=10` (a collective every 10th batch only) the callback "
                f"measures {pct(every10['overhead'])} ({pct(dc['callback_every10']['overhead'])}) against plain Lightning.")
    return section


def _fabric_rows(ctx: Context, p: dict[str, Any], section: Section) -> None:
    """A Lightning Fabric loop with and without ``FabricLoop``, measured side by side in one process per world size."""
    from fabric_overhead import add_rows

    table = Table("Fabric loop: per-step time with `preemptible.fabric.FabricLoop` against the same loop without it "
                  "(both arms in one process, interleaved; median [range] of per-repetition ratios)", [
                      "world size", "plain Fabric loop / step", "with FabricLoop / step", "overhead", "difference / step"])
    for ws in p["world_sizes"]:
        spec = {"devices": ws, "reps": p["reps"] if ws == 1 else p["reps_ddp"], "warmup": p["warmup"],
                "steps": p["steps"] if ws == 1 else p["steps_ddp"], "run_root": str(ctx.scratch(f"overhead-fabric-ws{ws}"))}
        ctx.log(f"overhead: Fabric loop, world size {ws}")
        res = require(run_worker("fabric_overhead", spec, ctx.workdir / f"overhead-fabric-ws{ws}.json", world_size=ws,
                                 timeout=900), f"overhead fabric ws={ws}")
        d = add_rows(table, section.data, ws, res)
        section.findings.append(
            f"Lightning Fabric, world size {ws}: {pct(d['overhead'])} per {secs(d['plain'])} step with `FabricLoop` "
            f"(registered state, exact data position, a stop vote per step), about {secs(d['fabric_loop'] - d['plain'])} "
            "per step.")
    table.note = ("Median wall-clock step of rank 0 per repetition (fetch, forward, backward, optimizer step, and for "
                  "FabricLoop `after_step()`); the same `Fabric`, model and optimizer serve both arms.")
    section.tables.append(table)


def worker(spec: dict[str, Any]) -> None:
    import os
    from pathlib import Path

    from workers import BallastModel, overhead_reps, setup_process

    setup_process()
    rank = int(os.environ.get("RANK", "0"))
    res = overhead_reps(int(spec["devices"]), rank, Path(spec["run_root"]), spec["reps"], spec["steps"],
                        spec["warmup"], spec["arms"], lambda: BallastModel(0))
    if rank == 0:
        write_result(spec, res)


if __name__ == "__main__":
    worker(read_spec(sys.argv))
