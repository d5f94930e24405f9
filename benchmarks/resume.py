"""3. Resume: process start → first resumed step, against process start → first step of a fresh run.

A preempted run leaves a committed checkpoint. Then, interleaved: *resumed* processes start from it
and *fresh* processes start in an empty run directory; both leave right after their first step.
"Process start" is the parent's clock just before it spawns the process; "first step" is the end of
the first optimizer step in the child (same machine, same clock). The resumed process also reports
how long ``resume_path()`` (size + crc32 validation) took and, after its first step, how long a
plain ``torch.load`` of the same file takes, so that the difference can be accounted for.
"""

from __future__ import annotations

from typing import Any

from common import (
    MB,
    Context,
    Section,
    Table,
    interleaved_order,
    mbytes,
    median,
    paired_ratios,
    ratio,
    require,
    run_worker,
    secs,
    spread,
)


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"mb": 8, "reps": 1}
    return {"mb": 320, "reps": 3}


def run(ctx: Context) -> Section:
    p = plan(ctx.quick)
    section = Section("resume", "3. Resume: start → first step, resumed vs fresh", method=(
        f"Same model as the save benchmark (tiny network + {p['mb']} MB of frozen weights), one process. A preempted "
        "run leaves a committed checkpoint; then *resumed* and *fresh* processes alternate "
        f"({p['reps']} each, order interleaved), each leaving right after its first optimizer step. Time = from the "
        "parent's clock just before spawning the process to the end of the first step in the child. Both include "
        "Python and Lightning start-up and building the model; the resumed one also validates (size + crc32 checksum) and "
        "loads the checkpoint. The resumed process reports its `resume_path()` (validation) time and, after the first "
        "step, the time of a plain `torch.load` of the same file."))
    run_dir = ctx.scratch("resume-run")
    spec = {"mb": p["mb"], "devices": 1, "max_steps": 8}
    ctx.log("resume: preempted run to create the checkpoint")
    first = require(run_worker("workers", dict(spec, run_dir=str(run_dir), signal_at=3), ctx.workdir / "resume-p.json",
                               timeout=600), "resume: preempted run", ok_codes=(144,))
    nbytes = first["checkpoint"]["bytes"]
    samples: dict[str, list[dict[str, Any]]] = {"resumed": [], "fresh": []}
    if ctx.quick:  # the preempted run started fresh: use it as the fresh sample (saves a process start)
        samples["fresh"].append(dict(first, start_to_first=first["first_step_at"] - first["_launched_at"],
                                     ready_to_first=first["first_step_at"] - first["ready_at"],
                                     setup_to_first=first["first_step_at"] - first["setup_at"]))
    for rep in range(p["reps"]):
        for arm in interleaved_order(["resumed", "fresh"], rep):
            if ctx.quick and arm == "fresh":
                continue
            ctx.log(f"resume: repetition {rep + 1}/{p['reps']}, {arm}")
            rd = run_dir if arm == "resumed" else ctx.scratch(f"resume-fresh-{rep}")
            res = require(run_worker("workers", dict(spec, run_dir=str(rd), exit_after_first_step=True,
                                                     measure_load=arm == "resumed"),
                                     ctx.workdir / f"resume-{arm}-{rep}.json", timeout=600), f"resume: {arm}")
            if arm == "resumed" and not res.get("resumed_from"):
                raise RuntimeError("the resumed process found no checkpoint to resume from")
            res["start_to_first"] = res["first_step_at"] - res["_launched_at"]
            res["ready_to_first"] = res["first_step_at"] - res["ready_at"]
            res["setup_to_first"] = res["first_step_at"] - res["setup_at"]
            samples[arm].append(res)

    resumed = [s["start_to_first"] for s in samples["resumed"]]
    fresh = [s["start_to_first"] for s in samples["fresh"]]
    r = paired_ratios(fresh, resumed)
    # Python + torch + Lightning imports take seconds and vary by as much as the load itself on a busy machine:
    # the difference is taken on the part after the imports, which is the same code except for the resume.
    ready_r = [s["ready_to_first"] for s in samples["resumed"]]
    ready_f = [s["ready_to_first"] for s in samples["fresh"]]
    extra = median([a - b for a, b in zip(ready_r, ready_f)])
    validate = median([s["resume_path_seconds"] for s in samples["resumed"]])
    load = median([s["torch_load_seconds"] for s in samples["resumed"]])
    resid = extra - validate - load
    table = Table(f"Start → first step with a {mbytes(nbytes)} checkpoint ({p['reps']} repetitions, medians)", [
        "", "fresh", "resumed", "resumed ÷ fresh [range]", "difference"])
    table.add("process start → first step", secs(median(fresh)), secs(median(resumed)),
              f"{ratio(median(r))} [{ratio(spread(r)[0])}, {ratio(spread(r)[1])}]",
              secs(median([a - b for a, b in zip(resumed, fresh)])))
    rr = paired_ratios(ready_f, ready_r)
    table.add("imports done → first step", secs(median(ready_f)), secs(median(ready_r)),
              f"{ratio(median(rr))} [{ratio(spread(rr)[0])}, {ratio(spread(rr)[1])}]", secs(extra))
    parts = Table("Where the difference goes", ["difference (after imports)", "validation (size + crc32)",
                                               "torch.load of the file", "rest"])
    parts.add(secs(extra), secs(validate), secs(load), secs(resid))
    section.tables += [table, parts]
    section.findings += [
        f"Resuming from {mbytes(nbytes)} takes {secs(extra)} more than a fresh start once the imports are done "
        f"(process start → first step: {ratio(median(r))} a fresh start, where seconds of imports dominate); validation "
        f"(crc32 of the file) is {secs(validate)} and `torch.load` {secs(load)}, leaving {secs(resid)} for everything else "
        "(copying the state into the model, optimizer, loops and loaders, and noise).",
        "With `verify='size'` the checksum pass is skipped on resume (size check only).",
    ]
    section.data = {"mb": nbytes / MB, "ratio": median(r), "ready_ratio": median(rr), "extra": extra, "validate": validate,
                    "load": load, "residual": resid, "fresh": median(fresh), "resumed": median(resumed)}
    return section
