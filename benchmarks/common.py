"""Shared by every benchmark module: the machine description, statistics, process launching, markdown.

Nothing here imports torch or Lightning: the parent process (``run_all.py``) stays light and every
measurement runs in child processes, each started the same way for the arms it compares.

Rules the modules follow (the machine is noisy and shared):

* compare arms **side by side in one run**: repetitions are interleaved (A B B A A B ...) and the
  reported figure is the median of the per-repetition ratios, never a lone absolute time;
* every child process gets a timeout, so a hang is a result, not a stuck benchmark.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PYTHON = sys.executable
MB = 1 << 20


# ---------------------------------------------------------------------------------------------------
# Run context and results
# ---------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A result table: ``columns`` are header strings, ``rows`` lists of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    def text(self) -> str:
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h) for i, h in enumerate(self.columns)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [self.title, fmt.format(*self.columns), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*r) for r in self.rows]
        return "\n".join(out)


@dataclass
class Section:
    """One measurement's part of RESULTS.md: what was measured, its tables, and what they mean."""

    key: str
    title: str
    method: str = ""
    tables: list[Table] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers, for later sections (grace uses growth)
    seconds: float = 0.0
    error: str = ""

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        if self.method:
            parts += [self.method, ""]
        if self.error:
            parts += ["**FAILED**:", "", "```", self.error.strip()[-3000:], "```", ""]
        for t in self.tables:
            parts += [t.markdown(), ""]
        if self.findings:
            parts += ["".join(f"- {f}\n" for f in self.findings)]
        parts += [f"_({self.seconds:.0f} s)_", ""]
        return "\n".join(parts)


@dataclass
class Context:
    quick: bool
    workdir: Path
    sections: dict[str, Section] = field(default_factory=dict)
    verbose: bool = True

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def scratch(self, name: str) -> Path:
        """A fresh, empty directory under the work directory."""
        path = self.workdir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


# ---------------------------------------------------------------------------------------------------
# Statistics and formatting
# ---------------------------------------------------------------------------------------------------
def median(xs: Iterable[float]) -> float:
    values = [x for x in xs if x is not None]
    return statistics.median(values) if values else float("nan")


def spread(xs: Iterable[float]) -> tuple[float, float]:
    """(min, max) of the values: with few repetitions, the range is more honest than a quartile."""
    values = [x for x in xs if x is not None]
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """b[i] / a[i] for each repetition: ratios of neighbours cancel the machine's slow drifts."""
    return [y / x for x, y in zip(a, b) if x and y is not None]


def interleaved_order(arms: Sequence[str], rep: int) -> list[str]:
    """The order of the arms in repetition ``rep``: rotate, and reverse every other repetition.

    With two arms this is A B, B A, A B, ...; with more, each arm takes each position in turn.
    """
    k = rep % len(arms)
    order = list(arms[k:]) + list(arms[:k])
    return order[::-1] if (rep // len(arms)) % 2 else order


def pct(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x * 100:+.{digits}f} %"


def ratio(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}×"


def secs(x: Optional[float]) -> str:
    if x is None or x != x:
        return "n/a"
    if abs(x) < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if abs(x) < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def mbytes(n: Optional[float]) -> str:
    if n is None or n != n:
        return "n/a"
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"


def rate(nbytes: float, seconds: float) -> float:
    return nbytes / MB / seconds if seconds else float("nan")


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` → (a, b)."""
    n = len(xs)
    if n < 2:
        return (float("nan"), float("nan"))
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return (my - b * mx, b)


# ---------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------
def child_env(extra: Optional[dict[str, str]] = None, slurm: bool = False) -> dict[str, str]:
    """The environment of a measured process: no scheduler variables leaking in from the caller's shell.

    One intra-op thread per process: two DDP ranks share this machine's cores, and the same setting
    for every arm keeps the comparison fair.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PREEMPTIBLE_", "SUBMITIT_", "MASTER_", "PL_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PL_DISABLE_FORK="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(BENCH_DIR), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """torchrun-style variables: Lightning's environment sees processes created externally."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size), "RANK": str(rank),
            "LOCAL_RANK": str(rank), "NODE_RANK": "0", "LOCAL_WORLD_SIZE": str(world_size)}


@dataclass
class Launch:
    """Processes of one launch (one per rank), started in their own session."""

    procs: list[subprocess.Popen]
    started: float
    log: Path

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def signal(self, sig: int, ranks: Optional[Iterable[int]] = None) -> None:
        for i, p in enumerate(self.procs):
            if (ranks is None or i in set(ranks)) and p.poll() is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float) -> tuple[list[Optional[int]], bool]:
        """Exit codes, and whether the timeout hit (then everything was killed)."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        timed_out = bool(self.alive())
        if timed_out:
            self.kill()
        return [p.returncode for p in self.procs], timed_out


def launch(cmd: Sequence[str], world_size: int = 1, env: Optional[dict[str, str]] = None, log: Optional[Path] = None,
           per_rank_env: Optional[Callable[[int], dict[str, str]]] = None) -> Launch:
    """Start ``cmd`` once per rank. With ``world_size > 1`` each gets torchrun-style rank variables
    (or ``per_rank_env(rank)``), so that no Lightning launcher forks anything behind our back."""
    env = dict(env or child_env())
    port = free_port()
    log = log or Path(os.devnull)
    out = open(log, "ab")
    procs = []
    started = time.time()
    try:
        for rank in range(world_size):
            e = dict(env)
            if per_rank_env is not None:
                e.update(per_rank_env(rank))
            elif world_size > 1:
                e.update(rank_env(rank, world_size, port))
            procs.append(subprocess.Popen(list(cmd), env=e, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                          cwd=str(ROOT)))
    finally:
        out.close()
    return Launch(procs, started, log)


def run_worker(module: str, spec: dict[str, Any], out: Path, world_size: int = 1, timeout: float = 300,
               env: Optional[dict[str, str]] = None, log: Optional[Path] = None) -> dict[str, Any]:
    """Run ``benchmarks/<module>.py worker <spec.json>`` on ``world_size`` ranks; return rank 0's JSON result.

    The result also carries ``_launched_at`` (the parent's clock just before the processes started),
    ``_exit_codes`` and ``_timed_out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(dict(spec, out=str(out))))
    out.unlink(missing_ok=True)
    log = log or out.with_suffix(".log")
    job = launch([PYTHON, str(BENCH_DIR / f"{module}.py"), "worker", str(spec_path)], world_size,
                 env=env, log=log)
    codes, timed_out = job.wait(timeout)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result.update(_launched_at=job.started, _exit_codes=codes, _timed_out=timed_out, _log=str(log))
    return result


def require(result: dict[str, Any], what: str, ok_codes: Iterable[int] = (0,)) -> dict[str, Any]:
    """Raise with the end of the log when a worker did not finish as expected."""
    codes = result.get("_exit_codes", [])
    if (result.get("_timed_out") or any(c not in set(ok_codes) for c in codes)
            or not any(k for k in result if not k.startswith("_"))):
        tail = ""
        try:
            tail = Path(result["_log"]).read_text(errors="replace")[-4000:]
        except (OSError, KeyError):
            pass
        raise RuntimeError(f"{what}: exit codes {codes}, timed out: {result.get('_timed_out')}\n{tail}")
    return result


def read_spec(argv: Sequence[str]) -> dict[str, Any]:
    """In a worker process: the spec the parent wrote (``<module>.py worker <spec.json>``)."""
    if len(argv) != 3 or argv[1] != "worker":
        raise SystemExit(f"usage: {argv[0]} worker SPEC.json (started by benchmarks/run_all.py)")
    return json.loads(Path(argv[2]).read_text())


def write_result(spec: dict[str, Any], result: dict[str, Any]) -> None:
    tmp = Path(spec["out"] + ".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, spec["out"])


def dd_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` sequentially and fsync them (``dd conv=fsync``, else Python)."""
    count = max(1, round(nbytes / (8 * MB)))
    dd = shutil.which("dd")
    t0 = time.perf_counter()
    if dd:
        subprocess.run([dd, "if=/dev/zero", f"of={path}", "bs=8M", f"count={count}", "conv=fsync"],
                       check=True, capture_output=True)
    else:
        block = b"\0" * (8 * MB)
        with open(path, "wb") as f:
            for _ in range(count):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    written = path.stat().st_size
    path.unlink()
    return seconds * nbytes / written  # per the requested size


# ---------------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _filesystem(path: Path) -> str:
    best, desc = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, opts = line.split()[:4]
            mnt = mnt.replace("\\040", " ")
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") or str(path.resolve()) == mnt:
                if len(mnt) >= len(best):
                    best, desc = mnt, f"{fstype} on {dev} (mounted at {mnt}, {opts.split(',')[0]})"
    except OSError:
        pass
    return desc


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def machine_description(workdir: Path) -> dict[str, str]:
    mem_total = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    load = "n/a"
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "RAM": mem_total,
        "filesystem (checkpoints)": _filesystem(workdir),
        "load average at start": load,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": _version("torch"),
        "pytorch-lightning": _version("pytorch-lightning"),
        "submitit": _version("submitit"),
        "preemptible": _version("preemptible"),
    }


def write_results(path: Path, machine: dict[str, str], command: str, sections: Sequence[Section], summary: Sequence[str],
                  quick: bool, total_seconds: float) -> None:
    lines = ["# preemptible benchmarks", ""]
    if quick:
        lines += ["> **--quick run**: tiny sizes and few repetitions, to check that the benchmarks work. "
                  "The numbers below are not meant to be quoted.", ""]
    lines += ["Generated by `make bench` (`benchmarks/run_all.py`). The machine is shared and noisy: every "
              "comparison below is measured **side by side in one run**, with the arms' repetitions interleaved, "
              "and reported as the median of per-repetition ratios. Absolute times are given only for context.", "",
              "## Machine", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    lines += ["", f"Command: `{command}` (total {total_seconds / 60:.1f} min)", ""]
    if summary:
        lines += ["## Summary", ""] + [f"- {s}" for s in summary] + [""]
    for s in sections:
        lines.append(s.markdown())
    path.write_text("\n".join(lines).rstrip() + "\n")
