"""4. Against the alternatives, same model, same machine.

Contenders, all training the same model on the same data with the same seed:

* **preemptible**: ``PreemptionCallback`` (requeue through ``scontrol``, as on SLURM);
* **Lightning auto-requeue**: ``SLURMEnvironment(auto_requeue=True)``: on SIGUSR1 its handler calls
  ``trainer.save_checkpoint`` (an ``hpc_ckpt_N.ckpt``) and ``scontrol requeue``; the next start finds
  the hpc checkpoint by itself;
* **submitit Checkpointable**: the documented pattern: a ``submitit.helpers.Checkpointable`` whose
  ``checkpoint()`` saves the trainer's state and returns a ``DelayedSubmission``; run by submitit's
  ``LocalExecutor``, signalled with SIGUSR2 (submitit's preemption signal), relaunched on exit 144.

The first two run under a simulated SLURM: ``SLURM_*`` variables per task, a stub ``scontrol`` on
``PATH`` that only records its call (and a stub ``squeue`` that does not know the job), and an emulated
controller that, once ``scontrol requeue`` was called, sends SIGTERM to every task, SIGKILL after a short
KillWait, and starts the job again with
``SLURM_RESTART_COUNT`` incremented. Every run is bounded: a run that makes no progress for a while
after the signal, without having asked for a requeue, is declared hung and killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import submitit
from common import BENCH_DIR, PYTHON, Context, Section, Table, child_env, free_port, launch, read_spec, secs

from preemptible.core.schema import JOURNAL_FILE, Event, read_events

CONTENDERS = ["preemptible", "lightning", "submitit"]
LABEL = {"preemptible": "preemptible", "lightning": "Lightning `SLURMEnvironment(auto_requeue=True)`",
         "submitit": "submitit `Checkpointable` (LocalExecutor)"}
SIGNAL = {"preemptible": signal.SIGUSR1, "lightning": signal.SIGUSR1, "submitit": signal.SIGUSR2}


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"mb": 4, "max_steps": 12, "signal_at": 5, "step_sleep": 0.03, "reference": False, "trial_targets": [],
                "hang_s": 8.0, "kill_wait": 5.0}
    return {"mb": 64, "max_steps": 30, "signal_at": 11, "step_sleep": 0.04, "reference": True, "trial_targets": [1, 0, 1],
            "hang_s": 10.0, "kill_wait": 5.0}


# ---------------------------------------------------------------------------------------------------
# Inside the training processes
# ---------------------------------------------------------------------------------------------------
def _append(path: str, entry: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def train(cfg: dict[str, Any], holder: Any = None) -> int:
    """One rank of the contender's training (the same model, data and seed for everyone)."""
    import pytorch_lightning as pl
    from lightning_fabric.plugins.environments import SLURMEnvironment
    from workers import BallastModel, setup_process

    from preemptible.examples.models import BlobsData
    from preemptible.tools.tracing import state_digest

    setup_process()
    record = cfg["record"]

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: Any, outputs: Any, *args: Any) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            _append(record, {"rank": trainer.global_rank, "pid": os.getpid(), "step": trainer.global_step,
                             "loss": float(loss.detach()).hex(), "t": time.time()})

        def on_fit_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
            _append(record, {"rank": trainer.global_rank, "pid": os.getpid(), "final": state_digest(pl_module)})

    pl.seed_everything(cfg["seed"], workers=True, verbose=False)
    contender = cfg["contender"]
    run_dir = Path(cfg["run_dir"])
    callbacks: list[Any] = [Recorder()]
    plugins: list[Any] = []
    ckpt: Optional[str] = None
    if contender == "preemptible":
        from preemptible import PreemptionCallback

        cb = PreemptionCallback(run_dir=run_dir)
        callbacks.insert(0, cb)
        ckpt = cb.resume_path()
    elif contender == "lightning":
        plugins.append(SLURMEnvironment(auto_requeue=True))  # resumes from default_root_dir/hpc_ckpt_N.ckpt by itself
    elif contender == "submitit":
        last = run_dir / "last.ckpt"
        ckpt = str(last) if last.exists() else None
    devices = int(cfg["devices"])
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=cfg["max_steps"], default_root_dir=str(run_dir), plugins=plugins, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, deterministic=True)
    save = trainer.save_checkpoint

    def timed_save(*args: Any, **kwargs: Any) -> Any:  # measures the contenders' own saves (preemptible: its journal)
        t0 = time.time()
        out = save(*args, **kwargs)
        _append(record, {"rank": trainer.global_rank, "pid": os.getpid(), "event": "save", "start": t0, "end": time.time(),
                         "step": trainer.global_step})
        return out

    trainer.save_checkpoint = timed_save  # type: ignore[method-assign]
    if holder is not None:
        holder.trainer = trainer
    model = BallastModel(cfg["mb"], step_sleep=cfg["step_sleep"])
    trainer.fit(model, datamodule=BlobsData(samples=256, batch_size=16), ckpt_path=ckpt)
    return trainer.global_step


class SubmititTrainer(submitit.helpers.Checkpointable):
    """submitit's documented pattern: ``checkpoint()`` saves, then returns the resubmission."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.trainer: Any = None

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # LocalExecutor: tell Lightning's DDP where its peers are
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.cfg["port"]), WORLD_SIZE=str(env.num_tasks),
                              RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), NODE_RANK="0",
                              LOCAL_WORLD_SIZE=str(env.num_tasks))
        return train(self.cfg, holder=self)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        if self.trainer is not None:
            t0 = time.time()
            self.trainer.save_checkpoint(str(Path(self.cfg["run_dir"]) / "last.ckpt"))
            _append(self.cfg["record"], {"rank": self.trainer.global_rank, "pid": os.getpid(), "event": "checkpoint",
                                         "start": t0, "end": time.time()})
        return submitit.helpers.DelayedSubmission(SubmititTrainer(self.cfg))


def worker(spec: dict[str, Any]) -> None:
    train(spec)


# ---------------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------------
class RecordTail:
    """Follows the per-step record file: progress of rank 0, and every entry."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        self._offset = 0
        self.step = -1

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.step
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            self.entries.append(e)
            if "step" in e and e.get("rank") == 0 and "event" not in e:
                self.step = max(self.step, e["step"])
        return self.step


@dataclass
class Signal:
    step: int
    signum: int
    ranks: Optional[list[int]] = None  # None: every rank


@dataclass
class Attempt:
    outcome: str = ""
    exit_codes: list[Optional[int]] = field(default_factory=list)
    signal_sent_at: Optional[float] = None
    signal_step: Optional[int] = None
    requeue_at: Optional[float] = None
    sigkilled: bool = False


STUB_SCONTROL = """#!/bin/sh
# Stub scontrol for the benchmark: records the call, does nothing else.
echo "$(date +%s.%N) $*" >> "$BENCH_SCONTROL_LOG"
exit 0
"""
# The simulated job is unknown to any real SLURM on this machine: answer as squeue would for it.
STUB_SQUEUE = """#!/bin/sh
echo "slurm_load_jobs error: Invalid job id specified" >&2
exit 1
"""


def _watch(alive: Callable[[], bool], tail: RecordTail, sig: Optional[Signal], send: Callable[[Signal], float],
           requeue_requested: Callable[[], Optional[float]], on_requeue: Callable[[], None], kill: Callable[[], None],
           hang_s: float, kill_wait: float, timeout: float) -> Attempt:
    a = Attempt()
    start = time.time()
    last_step, last_progress = tail.poll(), time.time()
    while True:
        now = time.time()
        step = tail.poll()
        if step != last_step:
            last_step, last_progress = step, now
        if sig is not None and a.signal_sent_at is None and step >= sig.step:
            a.signal_sent_at, a.signal_step = send(sig), step
        if a.requeue_at is None:
            a.requeue_at = requeue_requested()
            if a.requeue_at is not None:
                on_requeue()
        if not alive():
            break
        if a.requeue_at is not None and now > a.requeue_at + kill_wait:
            a.sigkilled = True
            kill()
            break
        if a.signal_sent_at is not None and a.requeue_at is None and now - max(a.signal_sent_at, last_progress) > hang_s:
            a.outcome = "hung"
            kill()
            break
        if now - start > timeout:
            a.outcome = "timeout"
            kill()
            break
        time.sleep(0.01)
    tail.poll()
    return a


def run_slurm_emulated(contender: str, cfg: dict[str, Any], wd: Path, sig: Optional[Signal], relaunch: bool,
                       hang_s: float, kill_wait: float, timeout: float = 240, max_attempts: int = 3) -> list[Attempt]:
    """Run the contender as a SLURM job on this machine (one process per task), as described above."""
    bindir = wd / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, text in (("scontrol", STUB_SCONTROL), ("squeue", STUB_SQUEUE)):
        stub = bindir / name
        stub.write_text(text)
        stub.chmod(0o755)
    tail = RecordTail(Path(cfg["record"]))
    devices = int(cfg["devices"])
    attempts: list[Attempt] = []
    for i in range(max_attempts):
        sclog = wd / f"scontrol-{i}.log"
        spec = wd / f"spec-{i}.json"
        spec.write_text(json.dumps(cfg))
        env = child_env({"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "BENCH_SCONTROL_LOG": str(sclog),
                         "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bench", "SLURM_NTASKS": str(devices),
                         "SLURM_NTASKS_PER_NODE": str(devices), "SLURM_NNODES": "1", "SLURM_NODEID": "0",
                         "SLURM_NODELIST": "localhost", "SLURM_RESTART_COUNT": str(i), "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(free_port())})
        job = launch([PYTHON, str(BENCH_DIR / "alternatives.py"), "worker", str(spec)], devices, env=env,
                     log=wd / f"log-{i}.txt", per_rank_env=lambda r: {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})

        # These closures are all called by _watch within this iteration; the loop variables are bound as defaults
        # to make that explicit.
        def requested(sclog: Path = sclog) -> Optional[float]:
            try:
                return float(sclog.read_text().split()[0])
            except (OSError, IndexError, ValueError):
                return None

        a = _watch(lambda job=job: bool(job.alive()), tail, sig if i == 0 else None,
                   lambda s, job=job: _timed(lambda: job.signal(s.signum, s.ranks)), requested,
                   lambda job=job: job.signal(signal.SIGTERM),  # scontrol requeue ends the running job: SIGTERM to every task
                   job.kill, hang_s, kill_wait, timeout)
        job.kill()
        a.exit_codes = [p.returncode for p in job.procs]
        if not a.outcome:
            a.outcome = _classify(a)
        attempts.append(a)
        if a.requeue_at is None or not relaunch:
            break
    return attempts


def _timed(action: Callable[[], None]) -> float:
    at = time.time()
    action()
    return at


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def run_submitit(cfg: dict[str, Any], wd: Path, sig: Optional[Signal], relaunch: bool, hang_s: float,
                 timeout: float = 240) -> list[Attempt]:
    """Run the submitit contender with ``LocalExecutor`` (which relaunches a task that exits with 144)."""
    import psutil

    tail = RecordTail(Path(cfg["record"]))
    cfg = dict(cfg, port=free_port())
    with _environ(child_env()):
        executor = submitit.LocalExecutor(folder=wd / "submitit")
        executor.update_parameters(timeout_min=60, tasks_per_node=int(cfg["devices"]))
        job = executor.submit(SubmititTrainer(cfg))
    controller = job._process  # LocalJob keeps its controller's Popen
    signalled: dict[int, psutil.Process] = {}

    def tasks() -> dict[int, psutil.Process]:
        out = {}
        try:
            for p in psutil.Process(controller.pid).children():
                with contextlib.suppress(psutil.Error, ValueError):
                    out[int(p.environ().get("SUBMITIT_LOCAL_GLOBALID", "-1"))] = p
        except psutil.Error:
            pass
        return out

    def send(s: Signal) -> float:
        signalled.update(tasks())
        at = time.time()
        for rank, p in signalled.items():
            if s.ranks is None or rank in s.ranks:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(s.signum)
        return at

    def running(p: Optional[psutil.Process]) -> bool:
        try:
            return p is not None and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def requested() -> Optional[float]:
        # submitit requeues from rank 0's handler: checkpoint() returned, then the task exits with 144
        saved = [e for e in tail.entries if e.get("event") == "checkpoint"]
        if not saved:
            return None
        return saved[-1]["end"] if relaunch or not running(signalled.get(0)) else None

    def alive() -> bool:
        if controller.poll() is not None:
            return False
        # one-rank trials stop at the requeue; full runs go on until submitit is done
        return relaunch or requested() is None

    a = _watch(alive, tail, sig, send, requested, lambda: None, lambda: _kill_tree(controller.pid), hang_s,
               kill_wait=timeout, timeout=timeout)
    if controller.poll() is None:
        _kill_tree(controller.pid)
    controller.wait()
    a.exit_codes = [controller.returncode]
    if not a.outcome:
        a.outcome = "requeued" if a.requeue_at else _classify(a)
    return [a]


def _classify(a: Attempt) -> str:
    if a.requeue_at is not None:
        return "requeued" + (" (SIGKILL needed)" if a.sigkilled else "")
    if all(c == 0 for c in a.exit_codes):
        return "finished, signal ignored" if a.signal_sent_at is not None else "finished"
    return f"crashed (exit {a.exit_codes})"


# ---------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------
def by_attempt(entries: list[dict[str, Any]], rank: int = 0) -> list[list[dict[str, Any]]]:
    """Rank ``rank``'s per-step entries grouped by process (one process per attempt), in order."""
    order: list[int] = []
    groups: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        if e.get("rank") != rank or "step" not in e or "event" in e:
            continue
        if e["pid"] not in groups:
            order.append(e["pid"])
            groups[e["pid"]] = []
        groups[e["pid"]].append(e)
    return [groups[p] for p in order]


def steps_lost(entries: list[dict[str, Any]]) -> list[int]:
    """Per preemption: steps trained before it that the next attempt trained again."""
    att = by_attempt(entries)
    return [max(e["step"] for e in a) - (min(e["step"] for e in b) - 1) for a, b in zip(att, att[1:])]


def final_view(entries: list[dict[str, Any]]) -> tuple[dict[tuple[int, int], str], dict[int, str]]:
    """(loss per (rank, step) as last trained, final weights digest per rank)."""
    losses: dict[tuple[int, int], str] = {}
    final: dict[int, str] = {}
    for e in entries:
        if "final" in e:
            final[e["rank"]] = e["final"]
        elif "step" in e and "event" not in e:
            losses[(e["rank"], e["step"])] = e["loss"]
    return losses, final


def identical(run: list[dict[str, Any]], reference: list[dict[str, Any]]) -> tuple[bool, str]:
    got, got_final = final_view(run)
    want, want_final = final_view(reference)
    if set(got) != set(want):
        return False, f"steps differ: {len(set(want) - set(got))} missing, {len(set(got) - set(want))} extra"
    differ = sorted(k for k in want if got[k] != want[k])
    if differ:
        return False, f"{len(differ)} of {len(want)} losses differ, first at step {differ[0][1]}"
    if got_final != want_final or not want_final:
        return False, "final weights differ"
    return True, f"all {len(want)} losses and the final weights"


def save_time(contender: str, entries: list[dict[str, Any]], run_dir: Path,
              sent_at: Optional[float]) -> tuple[Optional[float], Optional[float]]:
    """(signal sent → checkpoint written, duration of the save itself) for the first preemption."""
    if contender == "preemptible":
        ev = [e for e in read_events(run_dir / JOURNAL_FILE) if e.get("event") == Event.CHECKPOINT and e.get("rank") == 0]
        if not ev:
            return None, None
        return (ev[0]["time"] - sent_at if sent_at else None), ev[0]["seconds"]
    kind = "checkpoint" if contender == "submitit" else "save"
    ev = [e for e in entries if e.get("event") == kind]
    if not ev:
        return None, None
    return (ev[0]["end"] - sent_at if sent_at else None), ev[0]["end"] - ev[0]["start"]


# ---------------------------------------------------------------------------------------------------
def run(ctx: Context) -> Section:
    p = plan(ctx.quick)
    section = Section("alternatives", "4. Against the alternatives (same model, same machine)", method=(
        f"All contenders train the same model (tiny network + {p['mb']} MB of frozen weights, {p['step_sleep'] * 1e3:.0f} ms "
        f"of sleep per step so that a step takes a realistic time relative to the signal handling), batch 16, seed "
        f"1234, `deterministic=True`, {p['max_steps']} steps. The signal is sent when rank 0 has finished step "
        f"{p['signal_at']}. *preemptible* and *Lightning auto-requeue* run under a simulated SLURM (`SLURM_*` variables "
        "per task, a stub `scontrol` on `PATH` recording the call; once `scontrol requeue` is called, the emulated "
        f"controller sends SIGTERM to every task, SIGKILL after {p['kill_wait']:.0f} s, and starts the job again with "
        "`SLURM_RESTART_COUNT` + 1), signal SIGUSR1. *submitit* runs with `LocalExecutor` (which relaunches on exit "
        "144), signal SIGUSR2; its `checkpoint()` calls `trainer.save_checkpoint` and returns a `DelayedSubmission`, "
        "and the next start passes that file as `ckpt_path`. *Steps lost* = steps trained before the preemption that "
        "the next attempt trains again. *Bitwise identical* = every per-step loss (as last trained) and the final "
        "weights equal those of the same contender's uninterrupted run. A run is *hung* when, after the signal, it "
        f"makes no progress for {p['hang_s']:.0f} s without having asked for a requeue; it is then killed."))
    one = Table("Preempted once, one process, signal to the process", [
        "contender", "steps lost", "continuation bitwise identical", "signal → checkpoint written", "save itself",
        "checkpoint durable (fsync) and atomic"])
    trials = Table(f"2-rank DDP (gloo), signal to one rank only, {len(p['trial_targets'])} trials per contender", [
        "contender", "requeued cleanly", "hung (killed)", "signal ignored", "other", "outcomes (signalled rank: outcome)"])
    data: dict[str, Any] = {}
    base = {"mb": p["mb"], "max_steps": p["max_steps"], "step_sleep": p["step_sleep"], "seed": 1234}

    def go(contender: str, name: str, devices: int, sig: Optional[Signal],
           relaunch: bool) -> tuple[list[Attempt], dict[str, Any]]:
        wd = ctx.scratch(f"alt-{contender}-{name}")
        cfg = dict(base, contender=contender, devices=devices, run_dir=str(wd / "run"), record=str(wd / "record.jsonl"))
        (wd / "run").mkdir()
        ctx.log(f"alternatives: {contender}, {name}")
        if contender == "submitit":
            atts = run_submitit(cfg, wd, sig, relaunch, p["hang_s"])
        else:
            atts = run_slurm_emulated(contender, cfg, wd, sig, relaunch, p["hang_s"], p["kill_wait"])
        return atts, cfg

    for contender in CONTENDERS:
        d: dict[str, Any] = {}
        ref_entries = None
        if p["reference"]:
            atts, cfg = go(contender, "reference", 1, None, relaunch=False)
            if atts[-1].outcome != "finished":
                raise RuntimeError(f"{contender}: the uninterrupted reference run ended with {atts[-1].outcome}")
            ref_entries = _load(cfg["record"])
        atts, cfg = go(contender, "preempted", 1, Signal(p["signal_at"], SIGNAL[contender]), relaunch=True)
        entries = _load(cfg["record"])
        lost = steps_lost(entries)
        same, why = identical(entries, ref_entries) if ref_entries is not None else (None, "not checked in --quick")
        to_disk, duration = save_time(contender, entries, Path(cfg["run_dir"]), atts[0].signal_sent_at)
        durable = "yes (temp file, fsync, rename, commit record)" if contender == "preemptible" else \
            "no fsync; written in place (a kill mid-write leaves a torn file under the final name)"
        outcome = "; ".join(a.outcome for a in atts)
        d.update(lost=lost, identical=same, identical_detail=why, to_disk=to_disk, save=duration, outcomes=outcome)
        one.add(LABEL[contender], ", ".join(map(str, lost)) if lost else f"n/a ({outcome})",
                ("**yes**" if same else "**no**") + f" ({why})" if same is not None else why, secs(to_disk), secs(duration),
                durable)
        results = []
        for k, target in enumerate(p["trial_targets"]):
            atts, cfg = go(contender, f"trial{k}-rank{target}", 2, Signal(p["signal_at"], SIGNAL[contender], [target]),
                           relaunch=False)
            results.append((target, atts[0].outcome))
        if results:
            count = lambda pred, results=results: sum(1 for _, o in results if pred(o))  # noqa: E731
            clean = count(lambda o: o == "requeued")
            hung = count(lambda o: o == "hung")
            ignored = count(lambda o: "ignored" in o)
            trials.add(LABEL[contender], f"{clean}/{len(results)}", f"{hung}/{len(results)}", f"{ignored}/{len(results)}",
                       f"{len(results) - clean - hung - ignored}/{len(results)}",
                       "; ".join(f"rank {t}: {o}" for t, o in results))
            d.update(trials=results, hung=hung, clean=clean)
        data[contender] = d
    section.tables.append(one)
    if trials.rows:
        section.tables.append(trials)
    pre = data["preemptible"]
    section.findings.append(
        f"preemptible: {', '.join(map(str, pre['lost'])) or 'n/a'} step(s) lost, continuation "
        f"{'bitwise identical' if pre['identical'] else 'not identical' if pre['identical'] is not None else 'not checked'}"
        + (f", {pre['clean']}/{len(pre['trials'])} one-rank trials requeued cleanly" if pre.get("trials") else "") + ".")
    for c in ("lightning", "submitit"):
        d = data[c]
        section.findings.append(
            f"{LABEL[c]}: {', '.join(map(str, d['lost'])) or 'n/a'} step(s) lost, continuation "
            f"{'bitwise identical' if d['identical'] else 'not identical' if d['identical'] is not None else 'not checked'} "
            f"({d['identical_detail']})"
            + (f"; one rank signalled: {d['hung']}/{len(d['trials'])} hung" if d.get("trials") else "")
            + ".")
    section.findings.append(
        "Lightning's handler saves inside the signal handler, i.e. in the middle of whatever the step was doing, and "
        "`trainer.save_checkpoint` ends with a barrier: when only some ranks get the signal, they wait in that barrier "
        "while the others wait in the next training collective. submitit's handler acts on rank 0 only: a signal that "
        "reaches another rank is logged and dropped.")
    if not ctx.quick:
        section.findings.append("KillWait is shortened to a few seconds here; on a cluster the 30 s default only "
                                "lengthens how long a hung job holds its nodes.")
    section.data = data
    section.data["line"] = ("Alternatives: steps lost per preemption / bitwise continuation — " + "; ".join(
        f"{c}: {', '.join(map(str, data[c]['lost'])) or 'n/a'} / "
        f"{'yes' if data[c]['identical'] else 'no' if data[c]['identical'] is not None else 'n/a'}"
        + (f", hung {data[c]['hung']}/{len(data[c]['trials'])} one-rank trials" if data[c].get("trials") else "")
        for c in CONTENDERS) + ".")
    return section


def _load(path: str) -> list[dict[str, Any]]:
    tail = RecordTail(Path(path))
    tail.poll()
    return tail.entries


if __name__ == "__main__":
    worker(read_spec(sys.argv))
