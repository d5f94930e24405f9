"""``make bench``: run every benchmark, print the tables, write ``benchmarks/RESULTS.md``.

::

    python benchmarks/run_all.py                       # the full run (about 10 minutes)
    python benchmarks/run_all.py --quick               # tiny sizes, few repetitions (smoke test)
    python benchmarks/run_all.py --only save,resume    # some of them

Each module measures one thing and returns a :class:`common.Section`; a module that fails is
reported as failed in RESULTS.md and the others still run (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, Context, Section, machine_description, write_results  # noqa: E402

# Order matters: grace reads growth's numbers.
MODULES = ["overhead", "save", "resume", "alternatives", "growth", "grace", "periodic", "anywhere"]


def summary_lines(sections: dict[str, Section]) -> list[str]:
    """One line per headline ratio, from the sections' data."""
    out: list[str] = []
    get = lambda key: sections[key].data if key in sections and not sections[key].error else None  # noqa: E731
    if (d := get("overhead")) is not None:
        parts = [f"world size {k[2:]}: {v['overhead'] * 100:+.1f} % (median steps), {d[k + '_low']['overhead'] * 100:+.1f} % "
                 f"(least disturbed steps), {d[k + '_cpu']['overhead'] * 100:+.1f} % (CPU time) "
                 f"(its own hooks {v['hook_seconds'] * 1e6:.0f} µs = {v['hook_share'] * 100:.2f} % "
                 f"of a {v['plain'] * 1e3:.1f} ms step)"
                 for k, v in d.items() if k.startswith("ws") and not k.endswith(("_low", "_cpu"))]
        out.append("Per-step overhead on a tiny model (target ≤ 1 %): " + "; ".join(parts) + ".")
    if (d := get("save")) is not None and d:
        out.append(f"Emergency save of {d['mb']:.0f} MB, signal → committed: {d['emergency_vs_raw']:.2f}× raw torch.save+fsync "
                   f"(target ≤ 1.1×), {d['lightning_vs_raw']:.2f}× for Lightning's save_checkpoint+fsync; "
                   f"{d['emergency_vs_dd'] * 100:.0f} % of the filesystem's dd rate (target ≥ 80 %); extra peak RSS "
                   f"{d['emergency_rss_share'] * 100:.1f} % of the checkpoint (target ≤ 10 %) vs "
                   f"{d['lightning_rss_share'] * 100:.0f} % for Lightning.")
    if (d := get("resume")) is not None and d:
        out.append(f"Resume of {d['mb']:.0f} MB: start → first step is {d['ratio']:.2f}× a fresh start; the extra "
                   f"{d['extra']:.2f} s is validation (size + checksum) {d['validate']:.2f} s + torch.load {d['load']:.2f} s "
                   f"+ {d['residual']:.2f} s else.")
    if (d := get("alternatives")) is not None and d.get("line"):
        out.append(d["line"])
    if (d := get("growth")) is not None and d.get("line"):
        out.append(d["line"])
    if (d := get("grace")) is not None and d.get("line"):
        out.append(d["line"])
    if (d := get("periodic")) is not None and d.get("line"):
        out.append(d["line"])
    if (d := get("anywhere")) is not None and d.get("line"):
        out.append(d["line"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (for the smoke test)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(MODULES)}")
    ap.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"), help="markdown file to write")
    ap.add_argument("--workdir", default=None, help="scratch directory for checkpoints (default: a new one under "
                                                    "benchmarks/out/, removed afterwards); its filesystem is the one measured")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)

    names = MODULES if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {MODULES}")
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        (BENCH_DIR / "out").mkdir(exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=BENCH_DIR / "out"))
    ctx = Context(quick=args.quick, workdir=workdir)
    command = "python benchmarks/run_all.py" + (
        "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])))
    machine = machine_description(workdir)
    print("\n".join(f"{k}: {v}" for k, v in machine.items()), flush=True)

    started = time.time()
    failed = []
    try:
        for name in names:
            t0 = time.time()
            module = importlib.import_module(name)
            try:
                section = module.run(ctx)
            except Exception:  # noqa: BLE001 - report and go on with the others
                failed.append(name)
                section = Section(name, f"{name} (failed)", error=traceback.format_exc())
                print(section.error, file=sys.stderr, flush=True)
            section.seconds = time.time() - t0
            ctx.sections[name] = section
            print("\n" + "\n\n".join(t.text() for t in section.tables), flush=True)
            for f in section.findings:
                print(f"  - {f}", flush=True)
            print(flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summary_lines(ctx.sections)
    out = Path(args.out)
    write_results(out, machine, command, [ctx.sections[n] for n in names], summary, args.quick, time.time() - started)
    print("Summary:\n" + "\n".join(f"- {s}" for s in summary), flush=True)
    print(f"wrote {out} ({(time.time() - started) / 60:.1f} min)" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
