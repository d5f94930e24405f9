"""What runs inside the measured processes: the model with a chosen state size, timing callbacks, an
RSS sampler, and the generic training job that the save, resume and growth benchmarks launch.

``python benchmarks/workers.py worker SPEC.json`` runs :func:`job` (one rank; the parent starts one
process per rank with torchrun-style variables).
"""

from __future__ import annotations

import os
import resource
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from common import read_spec, write_result
from torch import nn

from preemptible import PreemptionCallback
from preemptible.core.schema import JOURNAL_FILE, Event, read_events
from preemptible.examples.models import BlobsData, TinyModel

_PAGE = os.sysconf("SC_PAGE_SIZE")


def setup_process() -> None:
    torch.set_num_threads(1)
    import warnings

    for pattern in (".*does not have many workers.*", ".*number of training batches.*", ".*srun.*", ".*SLURM.*",
                    ".*LightningEnvironment.*", ".*sync_dist.*", ".*Checkpoint directory.*", ".*GPU available.*",
                    ".*TPU available.*", ".*isinstance.*LeafSpec.*"):
        warnings.filterwarnings("ignore", pattern)
    import logging

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


class BallastModel(TinyModel):
    """The example's tiny network plus ``ballast_mb`` MB of frozen weights.

    The frozen tensor is part of ``state_dict`` (so of every checkpoint, and loaded on resume) but
    not of the optimizer or the gradient all-reduce: the training step costs the same at every state
    size, and only the checkpoint path can grow with it.
    """

    def __init__(self, ballast_mb: float = 0.0, step_sleep: float = 0.0) -> None:
        super().__init__(step_sleep=step_sleep)
        n = int(ballast_mb * (1 << 20) / 4)
        g = torch.Generator().manual_seed(7)
        self.ballast = nn.Parameter(torch.rand(n, generator=g) if n else torch.zeros(0), requires_grad=False)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Peak resident memory of this process while a block runs, sampled from a thread every ~1 ms.

    Python's GIL lets the sampler run at least every switch interval (5 ms) even while the main thread
    pickles; ``ru_maxrss`` catches a peak the samples miss, when the block sets a new lifetime maximum.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._maxrss_before = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "RssSampler":
        self.baseline = self.peak = rss_bytes()
        self._maxrss_before = max_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        """Extra bytes above the resident size at :meth:`start`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        maxrss = max_rss_bytes()
        if maxrss > self._maxrss_before:
            self.peak = max(self.peak, maxrss)
        return max(0, self.peak - self.baseline)


class StepTimer(pl.Callback):
    """Time of each optimizer step's end; the steady-state step time after ``warmup`` steps.

    On a shared machine a step stalls whenever another process takes the core (or its hyper-thread
    sibling), and a mean charges those stalls to whichever arm happened to run then. So the figures
    are order statistics of the step durations: the median, and the lower decile (the least disturbed
    steps, closest to the uncontended cost).
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any) -> None:
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())

    def durations(self, cpu: bool = False) -> list[float]:
        t = (self.cpu_times if cpu else self.times)[max(0, self.warmup - 1):]
        return sorted(b - a for a, b in zip(t, t[1:]))

    def per_step(self, quantile: float = 0.5, cpu: bool = False) -> float:
        d = self.durations(cpu)
        return d[min(len(d) - 1, int(quantile * len(d)))] if quantile != 0.5 else statistics.median(d)


class TimedCallback(PreemptionCallback):
    """``PreemptionCallback`` with a stopwatch around the hooks it runs on every step (median per step)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_hook = 0.0
        self.per_step: list[float] = []

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        super().on_train_batch_start(*args, **kwargs)
        self._start_hook = time.perf_counter() - t

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        super().on_train_batch_end(*args, **kwargs)
        self.per_step.append(self._start_hook + time.perf_counter() - t)

    def hook_seconds(self, warmup: int) -> float:
        return statistics.median(self.per_step[warmup:] or self.per_step)


class SignalSelf(pl.Callback):
    """Send this process a real signal at the end of optimizer step ``step`` (put it *before* the
    ``PreemptionCallback`` in the list, so the callback sees it at that same step boundary)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1, on_signal: Any = None) -> None:
        self.step = step
        self.signum = signum
        self.on_signal = on_signal
        self.sent_at: Optional[float] = None

    def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any) -> None:
        if self.sent_at is None and trainer.global_step >= self.step:
            if self.on_signal is not None:
                self.on_signal()
            self.sent_at = time.time()
            os.kill(os.getpid(), self.signum)


class FirstStep(pl.Callback):
    """Note the wall-clock time at which the first optimizer step of this process ends, and when Lightning's
    ``setup`` hook ran (after the process group exists, before a checkpoint is loaded)."""

    def __init__(self, then: Any = None) -> None:
        self.at: Optional[float] = None
        self.step: Optional[int] = None
        self.setup_at: Optional[float] = None
        self.then = then

    def setup(self, trainer: "pl.Trainer", pl_module: Any, stage: str) -> None:
        if self.setup_at is None:
            self.setup_at = time.time()

    def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any) -> None:
        if self.at is None:
            self.at, self.step = time.time(), trainer.global_step
            if self.then is not None:
                self.then(trainer)


def trainer_kwargs(devices: int, max_steps: int) -> dict[str, Any]:
    return {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto", "max_steps": max_steps,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "limit_val_batches": 0, "num_sanity_val_steps": 0}


def blobs(steps: int, devices: int, batch_size: int = 16) -> BlobsData:
    """Enough samples that the measured steps stay inside one epoch on every rank."""
    return BlobsData(samples=(steps + 2) * batch_size * devices, batch_size=batch_size)


def overhead_reps(devices: int, rank: int, run_root: Path, reps: int, steps: int, warmup: int, arms: list[str],
                  make_model: Any) -> dict[str, Any]:
    """Per-step time of fresh Trainers, arms interleaved in this process (every rank runs the same plan).

    Arms: ``plain`` (a plain Trainer), ``empty`` (plain plus a callback that does nothing: what Lightning's
    per-hook dispatch costs for any callback), ``callback`` (with ``PreemptionCallback``, no signal),
    ``callback_noexact`` (the callback with ``exact_data=False``: no per-batch bookkeeping of the data
    position and RNG), ``callback_every10`` (``agree_every_n_steps=10``), and ``no_pl_broadcast`` (plain, with
    Lightning's own per-step SIGTERM broadcast switched off: a reference for what one blocking collective per step
    costs).
    """
    from common import interleaved_order

    per_step: dict[str, list[float]] = {a: [] for a in arms}
    per_step_low: dict[str, list[float]] = {a: [] for a in arms}
    per_step_cpu: dict[str, list[float]] = {a: [] for a in arms}
    hook: dict[str, list[float]] = {}
    for rep in range(reps):
        for arm in interleaved_order(arms, rep):
            pl.seed_everything(1234, verbose=False)
            timer = StepTimer(warmup)
            callbacks: list[Any] = [timer]
            cb = None
            if arm == "empty":
                callbacks.insert(0, pl.Callback())
            if arm.startswith("callback"):
                # save_on_finish off: the final checkpoint after the timed steps would only lengthen the run
                cb = TimedCallback(run_dir=run_root / f"{arm}-{rep}", requeue="none", exact_data=arm != "callback_noexact",
                                   save_on_finish=False, agree_every_n_steps=10 if arm == "callback_every10" else 1)
                callbacks.insert(0, cb)
            trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(devices, warmup + steps))
            if arm == "no_pl_broadcast":
                trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None  # type: ignore[method-assign]
            trainer.fit(make_model(), datamodule=blobs(warmup + steps, devices))
            per_step[arm].append(timer.per_step())
            per_step_low[arm].append(timer.per_step(0.1))
            per_step_cpu[arm].append(timer.per_step(cpu=True))
            if cb is not None:
                hook.setdefault(arm, []).append(cb.hook_seconds(warmup))
    return {"per_step": per_step, "per_step_low": per_step_low, "per_step_cpu": per_step_cpu, "hook_seconds": hook}


# ---------------------------------------------------------------------------------------------------
# The generic job: start or resume, optionally preempt itself, optionally measure overhead afterwards
# ---------------------------------------------------------------------------------------------------
def job(spec: dict[str, Any]) -> None:
    """One rank of a preemptible training run of :class:`BallastModel`.

    spec: ``mb`` (ballast size), ``devices``, ``run_dir``, ``max_steps``, ``signal_at`` (self-signal at that
    step; every rank signals itself, as SLURM signals every task), ``exit_after_first_step`` (resume-time
    probes: leave right after the first step), ``measure_load`` (time ``torch.load`` of the resumed file
    after the first step), ``overhead`` (after training: interleaved plain/callback repetitions).
    """
    setup_process()
    devices = int(spec.get("devices", 1))
    rank = int(os.environ.get("RANK", "0"))
    pl.seed_everything(1234, verbose=False)
    result: dict[str, Any] = {"rank": rank}

    t = result["ready_at"] = time.time()  # imports done: from here on the work differs between fresh and resumed
    # No final checkpoint when a resumed run finishes: growth measures its resume, then per-step overhead.
    cb = PreemptionCallback(run_dir=spec["run_dir"], requeue="local", save_on_finish=False)
    resume = cb.resume_path()
    result["resume_path_seconds"] = time.time() - t  # validation of the newest checkpoint (size + checksum)
    result["resumed_from"] = resume

    def after_first(trainer: "pl.Trainer") -> None:
        result["first_step_at"], result["first_step"], result["setup_at"] = first.at, first.step, first.setup_at
        if spec.get("measure_load") and resume:
            t0 = time.perf_counter()
            torch.load(resume, map_location="cpu", weights_only=False)
            result["torch_load_seconds"] = time.perf_counter() - t0
        if spec.get("exit_after_first_step"):
            if rank == 0:
                write_result(spec, result)
            sys.stdout.flush()
            os._exit(0)

    first = FirstStep(then=after_first)
    callbacks: list[Any] = [first]
    if spec.get("signal_at") is not None:
        callbacks.append(SignalSelf(int(spec["signal_at"])))
    callbacks.append(cb)
    model = BallastModel(spec.get("mb", 0))
    steps = int(spec["max_steps"])
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(devices, steps))
    preempted = False
    try:
        trainer.fit(model, datamodule=blobs(steps, devices), ckpt_path=resume)
    except SystemExit as exc:  # Preempted
        preempted = exc.code == 144
        if not preempted:
            raise
    result["preempted"] = preempted
    result["global_step"] = trainer.global_step
    if preempted:
        for e in read_events(Path(spec["run_dir"]) / JOURNAL_FILE):
            if e.get("event") == Event.CHECKPOINT and e.get("rank") == 0:
                result["checkpoint"] = e
    elif spec.get("overhead"):
        del trainer
        o = spec["overhead"]
        # The same module in every repetition: building a 1 GB model per Trainer would dominate the run time.
        result["overhead"] = overhead_reps(devices, rank, Path(spec["run_dir"]) / "overhead", o["reps"], o["steps"],
                                           o["warmup"], ["plain", "callback"], lambda: model)
    if rank == 0:
        write_result(spec, result)
    sys.exit(144 if preempted else 0)


if __name__ == "__main__":
    job(read_spec(sys.argv))
