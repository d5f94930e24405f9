"""2. Emergency save: signal → committed checkpoint, against the raw cost of the same bytes.

Arms, interleaved by repetition (one process per repetition runs the torch arms in that repetition's
order, each with a fresh model and Trainer; dd runs from the parent):

* ``emergency``: ``PreemptionCallback``; the process sends itself SIGUSR1 at a step end; the time is
  the journal's ``signal_to_commit_seconds`` (signal received → file fsynced, renamed, commit record
  written, directory fsynced);
* ``raw``: ``torch.save`` of the same ``dump_checkpoint()`` dict into an open file, then ``fsync``;
* ``raw_nocrc``: the same without the zip container's CRC-32s (torch's ``compute_crc32`` switch),
  as preemptible writes it: the floor for this serializer;
* ``lightning``: ``trainer.save_checkpoint(path)`` (Lightning's ``TorchCheckpointIO``), then ``fsync``
  of the file (Lightning does not fsync; without it the bytes may still be only in the page cache);
* ``dd``: ``dd if=/dev/zero bs=8M conv=fsync`` of the same number of bytes: the filesystem's
  sequential write rate, in the same run;
* and, in the parent, the store's checksum (crc32) over as many bytes in memory (what it costs alone).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    MB,
    Context,
    Section,
    Table,
    dd_write,
    interleaved_order,
    mbytes,
    median,
    paired_ratios,
    rate,
    ratio,
    read_spec,
    require,
    run_worker,
    secs,
    spread,
    write_result,
)

from preemptible.core.schema import CHECKPOINT_DIR, JOURNAL_FILE, Event, read_events

ARMS = ["emergency", "raw", "raw_nocrc", "lightning", "dd"]


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"mb": 8, "reps": 1, "step": 3}
    return {"mb": 320, "reps": 4, "step": 3}


def checksum_seconds(nbytes: int) -> float:
    from preemptible.core.store import CHECKSUMS

    block = os.urandom(64 * MB)
    h = CHECKSUMS["crc32"]()
    t0 = time.perf_counter()
    done = 0
    while done < nbytes:
        h.update(block)
        done += len(block)
    return (time.perf_counter() - t0) * nbytes / done


def run(ctx: Context) -> Section:
    p = plan(ctx.quick)
    section = Section("save", "2. Emergency save vs raw torch.save, Lightning's save_checkpoint and the disk", method=(
        f"Model: the tiny network plus {p['mb']} MB of frozen weights (`benchmarks/workers.py: BallastModel`), one process. "
        "Arms interleaved over repetitions (one process per repetition, a fresh model and Trainer per arm): "
        "*emergency* = `PreemptionCallback`, the "
        "process sends itself SIGUSR1 at the end of a step, time from the handler's receipt to the committed checkpoint "
        "(journal `signal_to_commit_seconds`: streaming `torch.save` without the zip's CRC-32s through the writer that "
        "checksums (crc32) each buffer on a second thread while writing it in 32 MiB slices, each handed to the disk at "
        "once (`sync_file_range`), one fsync, rename, commit record, directory fsync); "
        "*raw* = `torch.save` of the same `dump_checkpoint()` dict into an open file + `fsync`; *raw without zip CRC* = "
        "the same with torch's `compute_crc32` switched off (`torch.load` never checks those CRCs; preemptible's own "
        "checksum replaces them); *Lightning* = `trainer.save_checkpoint` + `fsync` of the file "
        "(Lightning itself does not fsync); *dd* = "
        "`dd if=/dev/zero bs=8M conv=fsync` of the same number of bytes. Extra peak RSS = peak resident memory during the "
        "save (sampled every ~1 ms, and `ru_maxrss`) minus the resident memory just before it. Ratios are medians of "
        "per-repetition ratios."))
    reps: list[dict[str, Any]] = []
    hash_s: list[float] = []
    for rep in range(p["reps"]):
        got: dict[str, Any] = {}
        order = interleaved_order(ARMS, rep)
        worker_arms = [a for a in order if a != "dd"]
        ctx.log(f"save: repetition {rep + 1}/{p['reps']}, order {order}")
        # One process per repetition runs the three torch arms in this repetition's order, each with a fresh model
        # and Trainer (fresh processes per arm would triple the start-up cost that dominates the run time).
        res = require(run_worker("save", {"mb": p["mb"], "step": p["step"], "arms": worker_arms,
                                          "dir": str(ctx.scratch(f"save-{rep}"))}, ctx.workdir / f"save-{rep}.json",
                                 timeout=600), "save worker")
        got.update(res["arms"])
        got["dd"] = {"seconds": dd_write(ctx.workdir / "dd.bin", got["raw"]["bytes"]), "bytes": got["raw"]["bytes"]}
        hash_s.append(checksum_seconds(got["raw"]["bytes"]))
        reps.append(got)

    def col(arm: str, key: str = "seconds") -> list[float]:
        return [r[arm][key] for r in reps]

    raw = col("raw")
    nbytes = median(col("raw", "bytes"))
    em_bytes = median(col("emergency", "bytes"))
    dd_rate = median([rate(r["dd"]["bytes"], r["dd"]["seconds"]) for r in reps])
    rows = [
        ("raw `torch.save` + fsync", raw, col("raw", "bytes"), col("raw", "extra_rss")),
        ("raw `torch.save` without zip CRC + fsync", col("raw_nocrc"), col("raw_nocrc", "bytes"), col("raw_nocrc", "extra_rss")),
        ("**preemptible: signal → committed**", col("emergency"), col("emergency", "bytes"), col("emergency", "extra_rss")),
        ("preemptible: save started → committed", col("emergency", "save_seconds"), col("emergency", "bytes"), None),
        ("Lightning `save_checkpoint` (no fsync)", col("lightning", "save_seconds"), col("lightning", "bytes"), None),
        ("Lightning `save_checkpoint` + fsync", col("lightning"), col("lightning", "bytes"), col("lightning", "extra_rss")),
        ("`dd conv=fsync`, same size", col("dd"), col("dd", "bytes"), None),
    ]
    table = Table(f"Saving a {mbytes(nbytes)} checkpoint ({len(reps)} repetitions)", [
        "path", "time (median)", "÷ raw [range]", "throughput", "÷ dd rate", "extra peak RSS", "÷ checkpoint size"])
    dd_rates = [rate(r["dd"]["bytes"], r["dd"]["seconds"]) for r in reps]

    def of_dd(sizes: list[float], times: list[float]) -> float:
        """Median over repetitions of (throughput ÷ the dd rate measured in the same repetition)."""
        return median([rate(b, t) / d for b, t, d in zip(sizes, times, dd_rates)])

    for name, times, sizes, rss in rows:
        r = paired_ratios(raw, times)
        thr = median([rate(b, t) for b, t in zip(sizes, times)])
        table.add(name, secs(median(times)), f"{ratio(median(r))} [{ratio(spread(r)[0])}, {ratio(spread(r)[1])}]",
                  f"{thr:.0f} MB/s", f"{of_dd(sizes, times) * 100:.0f} %", mbytes(median(rss)) if rss else "",
                  f"{median(rss) / median(sizes) * 100:.1f} %" if rss else "")
    table.note = (f"In the same run, the store's crc32 over {mbytes(nbytes)} in memory took {secs(median(hash_s))} "
                  f"({rate(nbytes, median(hash_s)):.0f} MB/s): the emergency save computes it while it writes, "
                  "on a second thread, overlapped with the write of the same buffer.")
    section.tables.append(table)

    em_vs_raw = median(paired_ratios(raw, col("emergency")))
    pl_vs_raw = median(paired_ratios(raw, col("lightning")))
    em_rate = median([rate(b, t) for b, t in zip(col("emergency", "bytes"), col("emergency"))])
    em_of_dd = of_dd(col("emergency", "bytes"), col("emergency"))
    raw_rate = median([rate(b, t) for b, t in zip(col("raw", "bytes"), raw)])
    raw_of_dd = of_dd(col("raw", "bytes"), raw)
    em_rss = median(col("emergency", "extra_rss")) / em_bytes
    pl_rss = median(col("lightning", "extra_rss")) / median(col("lightning", "bytes"))
    targets = Table("Targets (issue 7)", ["target", "measured", "verdict"])
    targets.add("signal → committed ≤ 1.1× raw", ratio(em_vs_raw), "met" if em_vs_raw <= 1.1 else "missed")
    targets.add("extra peak RSS ≤ 10 % of the checkpoint", f"{em_rss * 100:.1f} %", "met" if em_rss <= 0.10 else "missed")
    targets.add("throughput ≥ 80 % of the filesystem's rate", f"{em_of_dd * 100:.0f} %", "met" if em_of_dd >= 0.8 else "missed")
    section.tables.append(targets)
    em_vs_floor = median(paired_ratios(col("raw_nocrc"), col("emergency")))
    extra_s = median(col("emergency")) - median(col("raw_nocrc"))
    section.findings += [
        f"Signal → committed checkpoint is {ratio(em_vs_raw)} the raw `torch.save`+fsync of the same state; Lightning's "
        f"`save_checkpoint`+fsync is {ratio(pl_vs_raw)}.",
        f"Against the serializer's floor (`torch.save` without the zip CRC-32s, + fsync) the emergency path is "
        f"{ratio(em_vs_floor)}" + (
            f": {secs(extra_s)} more (medians) for its checksum, the commit record, the directory fsync and the journal."
            if extra_s > 0 else
            f", {secs(-extra_s)} faster (medians) although it also checksums, commits a record, fsyncs the directory and "
            "journals: it asks the kernel to start writing each 32 MiB slice to the disk as soon as it is written "
            "(`sync_file_range`), so the disk works during serialization, while the floor's bytes (like dd's) wait in the "
            "page cache for the final fsync.") +
        f" The crc32 of the same bytes alone takes {secs(median(hash_s))}; it runs on a second thread while each buffer "
        "is written, hidden behind the write.",
        f"Extra peak memory: {em_rss * 100:.1f} % of the checkpoint for the emergency save (streamed, no in-memory copy), "
        f"{pl_rss * 100:.0f} % for Lightning's `save_checkpoint` (it serializes the whole checkpoint into a buffer first).",
        f"The filesystem's sequential rate (dd with fsync) was {dd_rate:.0f} MB/s; the emergency save reached "
        f"{em_rate:.0f} MB/s ({em_of_dd * 100:.0f} % of dd in the same repetition), and raw `torch.save` itself "
        f"{raw_rate:.0f} MB/s ({raw_of_dd * 100:.0f} %), and without its zip CRC-32s "
        f"{median([rate(b, t) for b, t in zip(col('raw_nocrc', 'bytes'), col('raw_nocrc'))]):.0f} MB/s "
        f"({of_dd(col('raw_nocrc', 'bytes'), col('raw_nocrc')) * 100:.0f} %): torch computes those CRCs on the saving "
        "thread, and `torch.load` never checks them.",
    ]
    section.data = {"mb": nbytes / MB, "bytes": nbytes, "emergency_vs_raw": em_vs_raw, "lightning_vs_raw": pl_vs_raw,
                    "emergency_vs_dd": em_of_dd, "raw_vs_dd": raw_of_dd, "dd_rate": dd_rate, "emergency_rate": em_rate,
                    "emergency_rss_share": em_rss, "lightning_rss_share": pl_rss, "hash_seconds": median(hash_s),
                    "emergency_seconds": median(col("emergency")), "raw_seconds": median(raw),
                    "emergency_vs_raw_nocrc": em_vs_floor}
    return section


# ---------------------------------------------------------------------------------------------------
# Worker: one process, the given arms in order, each with a fresh model and Trainer
# ---------------------------------------------------------------------------------------------------
def worker(spec: dict[str, Any]) -> None:
    import pytorch_lightning as pl
    import torch
    from torch.utils.serialization import config
    from workers import BallastModel, RssSampler, SignalSelf, blobs, setup_process, trainer_kwargs

    from preemptible import PreemptionCallback

    setup_process()
    out: dict[str, Any] = {}
    work = Path(spec["dir"])
    step = int(spec["step"])
    for arm in spec["arms"]:
        pl.seed_everything(1234, verbose=False)
        sampler = RssSampler()
        record: dict[str, Any] = {}

        class Act(pl.Callback):
            # Used only by the trainer.fit() below, in this same iteration; the loop variables are bound as defaults
            # (keyword-only, so Lightning's positional hook arguments never reach them) to make that explicit.
            def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any, arm: str = arm, sampler: RssSampler = sampler,
                                   record: dict[str, Any] = record) -> None:
                if trainer.global_step != step:
                    return
                path = work / f"{arm}.ckpt"
                sampler.start()
                t0 = time.perf_counter()
                if arm in ("raw", "raw_nocrc"):
                    ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
                    with open(path, "wb") as f, config.patch({"save.compute_crc32": arm == "raw"}):
                        torch.save(ckpt, f)
                        f.flush()
                        os.fsync(f.fileno())
                    del ckpt
                    t1 = time.perf_counter()
                else:
                    trainer.save_checkpoint(path)
                    t1 = time.perf_counter()
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
                t2 = time.perf_counter()
                record.update(seconds=t2 - t0, save_seconds=t1 - t0, extra_rss=sampler.stop(), bytes=path.stat().st_size)
                path.unlink()
                trainer.should_stop = True

        callbacks: list[Any]
        run_dir = work / f"run-{arm}"
        if arm == "emergency":
            callbacks = [SignalSelf(step, on_signal=sampler.start), PreemptionCallback(run_dir=run_dir, requeue="local")]
        else:
            callbacks = [Act()]
        trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(1, step + 5))
        try:
            trainer.fit(BallastModel(spec["mb"]), datamodule=blobs(step + 5, 1))
        except SystemExit as exc:
            if exc.code != 144:
                raise
            extra = sampler.stop()
            ev = [e for e in read_events(run_dir / JOURNAL_FILE) if e.get("event") == Event.CHECKPOINT][-1]
            record.update(seconds=ev["signal_to_commit_seconds"], save_seconds=ev["seconds"], bytes=ev["bytes"], extra_rss=extra)
            for f in (run_dir / CHECKPOINT_DIR).glob("step-*"):
                f.unlink()
        if not record:
            raise RuntimeError(f"arm {arm}: nothing was measured")
        out[arm] = record
        del trainer
        gc.collect()
    write_result(spec, {"arms": out})


if __name__ == "__main__":
    worker(read_spec(sys.argv))
