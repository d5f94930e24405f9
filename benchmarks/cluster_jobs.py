"""Final states of many short 2-rank jobs on the real cluster: do finished jobs end COMPLETED, and crashed ones recover?

``python benchmarks/cluster_jobs.py --jobs 50`` (``make cluster-jobs``) submits short preemptible DDP jobs with
``preemptible sbatch`` on the local cluster (docker/slurm/cluster.sh start --nodes 2; ``source
/tmp/preemptible-slurm/env.sh``), waits for every one of them (bounded), and counts final states from SLURM's
job completion log and exit codes from the jobs' journals. Arms:

* ``finish``: 2 ranks (``--nodes 2``, one per node) train to the end: every job must end COMPLETED, exit 0:0
  (the process-group teardown at exit: no "terminate called without an active exception", exit 134);
* ``crash``: the same with rank 1 SIGKILLed at step 6 after a periodic checkpoint: every job must be requeued
  by its batch shell once and end COMPLETED.

It writes its section of ``benchmarks/FAULTS.md`` (between the ``cluster-jobs`` markers, kept by
``benchmarks/faults.py`` when that rewrites the rest).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preemptible.core.schema import Event, read_events  # noqa: E402
from preemptible.examples.train import options_to_argv  # noqa: E402

FAULTS_MD = REPO / "benchmarks" / "FAULTS.md"
BEGIN, END = "<!-- cluster-jobs:begin -->", "<!-- cluster-jobs:end -->"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
ARMS: dict[str, dict[str, object]] = {
    "finish": {"max_steps": 8},
    "crash": {"max_steps": 12, "every_n_steps": 4, "sync_periodic": True, "signal_at": ["6"], "signal_rank": 1,
              "signal_name": "KILL"},
}
_FIELD = re.compile(r"(\w+)=(\S*)")


def submit(workdir: Path, name: str, options: dict[str, object]) -> tuple[str, Path]:
    run_dir = workdir / name
    command = [sys.executable, "-m", "preemptible.examples.train", "--devices", "1", "--num-nodes", "2",
               *options_to_argv(**options)]
    done = subprocess.run([sys.executable, "-m", "preemptible.cli", "sbatch", "--template", "ddp", "--nodes", "2",
                           "--ntasks-per-node", "1", "--cpus-per-task", "1", "--partition", "low",
                           "--job-name", f"pt-bench-{name}", "--run-dir", str(run_dir), "--", *command],
                          capture_output=True, text=True, timeout=60, cwd=workdir)
    if done.returncode != 0:
        raise SystemExit(f"preemptible sbatch failed: {done.stderr}")
    return done.stdout.strip(), run_dir


def completion_records(jobcomp: Path) -> dict[str, list[dict[str, str]]]:
    """JobId → the job completion log's records (one per ended attempt, requeued ones included)."""
    records: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    if jobcomp.exists():
        for line in jobcomp.read_text().splitlines():
            fields = dict(_FIELD.findall(line))
            if "JobId" in fields:
                records[fields["JobId"]].append(fields)
    return records


def queued(job_ids: set[str]) -> set[str]:
    done = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30)
    return job_ids & set(done.stdout.split())


def run_arm(arm: str, count: int, workdir: Path, jobcomp: Path, timeout: float) -> dict:
    started = time.monotonic()
    jobs = dict(submit(workdir, f"{arm}-{i}", ARMS[arm]) for i in range(count))
    deadline = time.monotonic() + timeout
    while True:
        records = completion_records(jobcomp)
        in_queue = queued(set(jobs))
        waiting = {j for j in jobs if j in in_queue or not records.get(j) or records[j][-1].get("JobState") not in FINAL}
        if not waiting:
            break
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *waiting], timeout=30, check=False)
            break
        time.sleep(2)
    records = completion_records(jobcomp)
    states = collections.Counter(records[j][-1].get("JobState", "?") if records.get(j) else "no record" for j in jobs)
    exits = collections.Counter(records[j][-1].get("ExitCode", "?") if records.get(j) else "?" for j in jobs)
    requeues = collections.Counter(len(records.get(j, [])) - 1 for j in jobs)
    crash_decisions = collections.Counter(e.get("decision") for run_dir in jobs.values() for e in read_events(run_dir)
                                          if e.get("event") == Event.CRASH)
    failures = [f"job {j}: {records[j][-1].get('JobState')} {records[j][-1].get('ExitCode')} ({jobs[j]})"
                for j in jobs if records.get(j) and records[j][-1].get("JobState") != "COMPLETED"]
    return {"arm": arm, "jobs": count, "states": dict(states), "exits": dict(exits), "requeues": dict(requeues),
                "crash_decisions": dict(crash_decisions), "failures": failures, "seconds": time.monotonic() - started}


def section(results: list[dict], argv: Sequence[str]) -> str:
    import torch

    lines = [BEGIN, "", "## Final states of short 2-rank jobs on the cluster", "",
             f"Written by `python benchmarks/cluster_jobs.py {' '.join(argv)}` on {time.strftime('%Y-%m-%d')}: the local "
             f"two-node cluster (docker/slurm/cluster.sh start --nodes 2), {os.cpu_count()} CPUs, {platform.system()}, "
             f"torch {torch.__version__}. Each job: the ddp template with `--nodes 2`, one gloo rank per node. Final "
             "states from SLURM's job completion log.", "",
             "| arm | jobs | COMPLETED | other final states | exit codes | requeues per job | crash decisions | minutes |",
             "|---|---:|---:|---|---|---|---|---:|"]
    for r in results:
        other = ", ".join(f"{s}: {n}" for s, n in sorted(r["states"].items()) if s != "COMPLETED") or "none"
        lines.append(f"| {r['arm']} | {r['jobs']} | {r['states'].get('COMPLETED', 0)} | {other} | "
                     f"{', '.join(f'{c}: {n}' for c, n in sorted(r['exits'].items()))} | "
                     f"{', '.join(f'{k}: {n}' for k, n in sorted(r['requeues'].items()))} | "
                     f"{', '.join(f'{k}: {n}' for k, n in sorted(r['crash_decisions'].items())) or '-'} | "
                     f"{r['seconds'] / 60:.1f} |")
    lines += ["", "Arms: *finish* — trained to the end (exit 0 expected: no abort at interpreter exit); *crash* — rank 1 "
              "SIGKILLed at step 6 after a periodic checkpoint (requeued once by the batch shell, then COMPLETED)."]
    problems = [f for r in results for f in r["failures"]]
    lines += ["", "Jobs that did not end COMPLETED: " + ("none." if not problems else ""), *[f"* {p}" for p in problems]]
    lines += ["", END, ""]
    return "\n".join(lines)


def write_section(text: str, path: Path = FAULTS_MD) -> None:
    """Replace (or append) the cluster-jobs section of FAULTS.md, leaving the rest as it is."""
    old = path.read_text() if path.exists() else "# Fault-injection campaign\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + text + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=50, help="jobs per arm (default 50)")
    p.add_argument("--crash-jobs", type=int, default=None, help="jobs of the crash arm (default: --jobs)")
    p.add_argument("--arms", default="finish,crash", help=f"comma-separated: {', '.join(ARMS)}")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for an arm's jobs (then they are cancelled)")
    p.add_argument("--slurm-dir", type=Path, default=Path(os.environ.get("PREEMPTIBLE_SLURM_DIR", "/tmp/preemptible-slurm")))
    p.add_argument("--out", type=Path, default=FAULTS_MD)
    args = p.parse_args(argv)
    if not os.environ.get("SLURM_CONF"):
        os.environ["SLURM_CONF"] = str(args.slurm_dir / "slurm.conf")
    results = []
    with tempfile.TemporaryDirectory(prefix="cluster-jobs-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        for arm in filter(None, args.arms.split(",")):
            if arm not in ARMS:
                raise SystemExit(f"unknown arm {arm!r}: use {', '.join(ARMS)}")
            count = args.crash_jobs if arm == "crash" and args.crash_jobs is not None else args.jobs
            result = run_arm(arm, count, Path(tmp), args.slurm_dir / "jobcomp.log", args.timeout)
            print(result, flush=True)
            results.append(result)
    write_section(section(results, argv), args.out)
    print(f"wrote {args.out}")
    return 0 if all(not r["failures"] and sum(r["states"].values()) == r["jobs"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
