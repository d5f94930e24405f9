"""5. Growth: save time, resume time and per-step overhead as the state grows, world size 1 and 2.

For each state size and world size, two launches of the same job (``workers.py``):

1. a fresh run that signals itself (every rank, as SLURM signals every task) and writes the
   emergency checkpoint: signal → committed from the journal, start → first step of a fresh run;
2. a run that resumes from it: start → first step, finishes training, then measures the per-step
   overhead of the callback against a plain Trainer with the same (large) model, interleaved.
"""

from __future__ import annotations

from typing import Any

from common import (
    MB,
    Context,
    Section,
    Table,
    linear_fit,
    mbytes,
    median,
    paired_ratios,
    pct,
    rate,
    require,
    run_worker,
    secs,
    spread,
)


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"sizes_mb": [1], "world_sizes": [1], "overhead": {"reps": 2, "steps": 20, "warmup": 5}}
    return {"sizes_mb": [1, 64, 1024], "world_sizes": [1, 2], "overhead": {"reps": 4, "steps": 80, "warmup": 10}}


def run(ctx: Context) -> Section:
    p = plan(ctx.quick)
    section = Section("growth", "5. Growth with the state size and the world size", method=(
        "Tiny network + N MB of frozen weights (in `state_dict`, not in the optimizer or the gradient all-reduce, so the "
        "training step itself does not grow). Per point: one fresh run that signals itself on every rank and writes the "
        "emergency checkpoint, then one run that resumes from it, finishes, and measures the per-step overhead "
        f"(plain vs callback, {p['overhead']['reps']} interleaved repetitions of {p['overhead']['steps']} steps, same "
        "module). *Resume extra* = the resumed run's validation of the checkpoint (size + crc32, before `fit`) plus its "
        "(Lightning `setup` hook → first step) minus the fresh run's: one sample each, so small values are within noise. "
        "Under DDP every rank holds the state; rank 0 writes the file."))
    table = Table("Save, resume and per-step overhead by state size", [
        "world size", "checkpoint", "signal → committed", "save throughput", "resume extra", "per step: plain",
        "per-step overhead [range]"])
    points: list[dict[str, Any]] = []
    for ws in p["world_sizes"]:
        for mb in p["sizes_mb"]:
            ctx.log(f"growth: {mb} MB, world size {ws}")
            rd = ctx.scratch(f"growth-{ws}-{mb}")
            spec = {"mb": mb, "devices": ws, "max_steps": 10, "run_dir": str(rd)}
            first = require(run_worker("workers", dict(spec, signal_at=4), ctx.workdir / f"growth-{ws}-{mb}-a.json",
                                       world_size=ws, timeout=900), f"growth {mb} MB ws={ws}: preempted run", ok_codes=(144,))
            second = require(run_worker("workers", dict(spec, overhead=p["overhead"]), ctx.workdir / f"growth-{ws}-{mb}-b.json",
                                        world_size=ws, timeout=900), f"growth {mb} MB ws={ws}: resumed run")
            if not second.get("resumed_from"):
                raise RuntimeError(f"growth {mb} MB ws={ws}: the second run did not resume")
            ck = first["checkpoint"]
            o = second["overhead"]["per_step"]
            r = paired_ratios(o["plain"], o["callback"])
            pt = {"ws": ws, "mb": mb, "bytes": ck["bytes"], "save": ck["signal_to_commit_seconds"],
                  # validation before fit + (set-up → first step) difference; set-up = Lightning's setup hook, after the
                  # process group exists, so rank 1's import time does not leak into rank 0's figure
                  "resume_extra": second["resume_path_seconds"] + (second["first_step_at"] - second["setup_at"])
                  - (first["first_step_at"] - first["setup_at"]),
                  "plain": median(o["plain"]), "overhead": median(r) - 1, "range": [spread(r)[0] - 1, spread(r)[1] - 1]}
            points.append(pt)
            table.add(ws, mbytes(pt["bytes"]), secs(pt["save"]), f"{rate(pt['bytes'], pt['save']):.0f} MB/s",
                      secs(pt["resume_extra"]), secs(pt["plain"]),
                      f"{pct(pt['overhead'])} [{pct(pt['range'][0])}, {pct(pt['range'][1])}]")
    section.tables.append(table)

    fits = Table("Linear fits, time = fixed + size ÷ rate", ["world size", "save: fixed", "save: rate", "resume: fixed",
                                                              "resume: rate"])
    section.data = {"points": points, "fits": {}}
    for ws in p["world_sizes"]:
        pts = [x for x in points if x["ws"] == ws]
        xs = [x["bytes"] / MB for x in pts]
        a, b = linear_fit(xs, [x["save"] for x in pts])
        ra, rb = linear_fit(xs, [x["resume_extra"] for x in pts])
        section.data["fits"][ws] = {"save_fixed": a, "save_s_per_mb": b, "resume_fixed": ra, "resume_s_per_mb": rb}
        fits.add(ws, secs(a), f"{1 / b:.0f} MB/s" if b == b and b > 0 else "n/a", secs(ra),
                 f"{1 / rb:.0f} MB/s" if rb == rb and rb > 0 else "n/a")
    if len(points) >= 2:
        section.tables.append(fits)
    biggest = max(points, key=lambda x: x["bytes"])
    smallest = min(points, key=lambda x: x["bytes"])
    over = [x["overhead"] for x in points]
    section.findings += [
        "Save and resume time grow **linearly with the state size** (O(bytes): one streaming pass to write and hash, "
        "one to read and hash, no in-memory copy), plus a fixed cost of a few fsyncs and small records; "
        f"from {mbytes(smallest['bytes'])} to {mbytes(biggest['bytes'])} the save went from {secs(smallest['save'])} "
        f"to {secs(biggest['save'])}.",
        "The per-step overhead does not depend on the state size (O(1) per step: between signals the callback touches "
        f"no tensor of the model): {', '.join(pct(x) for x in over)} over the points in the table's order, with no "
        "trend in the size beyond this machine's noise.",
    ]
    if len(p["world_sizes"]) > 1:
        def at(ws: int) -> dict[str, Any]:
            return max((x for x in points if x["ws"] == ws), key=lambda x: x["bytes"])
        one, two = at(1), at(2)
        section.findings.append(
            f"World size 2 vs 1 at {mbytes(two['bytes'])}: save {secs(two['save'])} vs {secs(one['save'])} (rank 0 writes "
            "the one file; the other rank adds a gather of its RNG and loader states, kilobytes, while sharing this "
            f"machine's two cores), resume extra {secs(two['resume_extra'])} vs {secs(one['resume_extra'])}: only global rank 0 "
            "validates (crc32) the file, the other ranks take its verdict (core/verdict.py), and each rank loads it once, "
            "memory-mapped (core/mapped.py): the ranks share the file's pages in the page cache and copy the weights "
            "straight from there into their models.")
    section.data["line"] = ("Growth: save and resume time linear in the state size (" +
                            ", ".join(f"ws={ws}: {1 / f['save_s_per_mb']:.0f} MB/s save" for ws, f in section.data["fits"].items()
                                      if f["save_s_per_mb"] == f["save_s_per_mb"] and f["save_s_per_mb"] > 0) +
                            "); per-step overhead independent of it.")
    return section
