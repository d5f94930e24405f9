"""``preemptible check``: does *your* model resume bit for bit? Run it uninterrupted and preempted, compare.

The user's factory returns ``(LightningModule, datamodule_or_dataloaders, trainer_kwargs)``. Each
run is a real process (or two ranks under DDP) with a real signal; the preempted run is relaunched
by the local supervisor. Every training step's loss and weights digest are compared, and at the end
the final ``state_dict`` tensor by tensor, so a difference is reported with its first step and tensor.

Example::

    preemptible check mypkg.train:make --steps 30 --preempt-at 12 --ranks 2
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from preemptible.core.schema import read_trace
from preemptible.tools.simulator import LocalSupervisor, Preemption, RunSummary

__all__ = ["check_resume", "CheckReport", "StepComparison", "load_factory"]


@dataclass
class StepComparison:
    key: tuple[Any, ...]
    reference: Optional[str]
    resumed: Optional[str]
    weights_equal: Optional[bool]

    @property
    def equal(self) -> bool:
        return self.reference == self.resumed and self.weights_equal is not False


@dataclass
class CheckReport:
    """The outcome of one check: identical or not, and where the runs part."""

    steps: int
    preempt_at: str
    ranks: int
    stop_step: Optional[int] = None
    resumed_from_step: Optional[int] = None
    comparisons: list[StepComparison] = field(default_factory=list)
    missing: list[tuple[Any, ...]] = field(default_factory=list)
    replayed: list[tuple[Any, ...]] = field(default_factory=list)
    tensor_differences: list[str] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def first_difference(self) -> Optional[StepComparison]:
        return next((c for c in self.comparisons if not c.equal), None)

    @property
    def identical(self) -> bool:
        return (self.error is None and self.first_difference is None and not self.missing
                and not self.replayed and not self.tensor_differences and bool(self.comparisons))


def load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r}: give the factory as MODULE:FUNCTION, e.g. mypkg.train:make_experiment")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None


def run_reference_and_preempted(work: Path, commands: dict[str, tuple[list[str], list[Preemption]]],
                                timeout: float) -> tuple[dict[str, RunSummary], Optional[str]]:
    """Run each ``name: (command, plan)`` (one of them named ``preempted``) under the local supervisor, its output in
    ``work/<name>.log``, the run directory ``work/<name>``; returns the summaries and the error that stops a
    check: a run that failed, or a preempted run that was never preempted."""
    runs: dict[str, RunSummary] = {}
    for name, (cmd, plan) in commands.items():
        with open(work / f"{name}.log", "wb") as log:
            summary = LocalSupervisor(cmd, run_dir=work / name, plan=plan, timeout=timeout, max_restarts=3,
                                      stdout=log).run()
        runs[name] = summary
        if summary.exit_code != 0:
            return runs, f"the {name} run failed with exit code {summary.exit_code}; see {work / (name + '.log')}"
    if len(runs["preempted"].attempts) < 2:
        return runs, ("the preempted run was never preempted (the signal came after training ended?); "
                      "choose a smaller --preempt-at")
    return runs, None


def check_resume(factory: str, steps: int = 20, preempt_at: Optional[int] = None, ranks: int = 1,
                 workdir: os.PathLike[str] | str = "runs/check", signal: str = "USR1", seed: int = 1234,
                 timeout: float = 600.0) -> CheckReport:
    """Run ``factory`` for ``steps`` steps uninterrupted and preempted at ``preempt_at`` (random if ``None``)."""
    if steps < 3:
        raise ValueError("--steps must be at least 3: a step before, at and after the preemption")
    point = preempt_at if preempt_at is not None else random.Random(seed).randint(1, steps - 2)
    if not 0 <= point < steps:
        raise ValueError(f"--preempt-at {point} must be in [0, {steps - 1}]")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = CheckReport(steps=steps, preempt_at=str(point), ranks=ranks)
    commands: dict[str, tuple[list[str], list[Preemption]]] = {}
    for name, signal_at in (("reference", None), ("preempted", str(point))):
        run_dir, trace = work / name, work / f"{name}.jsonl"
        _clear(run_dir, trace)
        cmd = [sys.executable, "-m", "preemptible.tools.checking", "--factory", factory, "--run-dir", str(run_dir),
               "--steps", str(steps), "--ranks", str(ranks), "--trace", str(trace), "--seed", str(seed), "--signal", signal]
        if signal_at is not None:
            cmd += ["--signal-at", signal_at]
        commands[name] = (cmd, [])
    runs, report.error = run_reference_and_preempted(work, commands, timeout)
    if report.error:
        return report
    attempts = runs["preempted"].attempts
    report.stop_step, report.resumed_from_step = attempts[0].stop_step, attempts[1].resumed_from_step
    _compare(report, work / "reference.jsonl", work / "preempted.jsonl", ranks)
    return report


def _clear(run_dir: Path, trace: Path) -> None:
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    for p in [trace, *trace.parent.glob(trace.stem + ".rank*.pt")]:
        p.unlink(missing_ok=True)


def _compare(report: CheckReport, ref_trace: Path, got_trace: Path, ranks: int) -> None:
    import torch

    reference, resumed = read_trace(ref_trace), read_trace(got_trace)
    ref, got = reference.entries, resumed.entries
    report.replayed = list(resumed.duplicates)
    report.missing = sorted(k for k in ref if k not in got)
    for key in sorted(k for k in ref if k in got):
        a, b = ref[key], got[key]
        weights = None if "weights" not in a else a.get("weights") == b.get("weights")
        report.comparisons.append(StepComparison(key, a.get("loss"), b.get("loss"), weights))
    for rank in range(ranks):
        ref_state = ref_trace.with_suffix(f".rank{rank}.pt")
        got_state = got_trace.with_suffix(f".rank{rank}.pt")
        if not (ref_state.exists() and got_state.exists()):
            report.tensor_differences.append(f"rank {rank}: final state missing")
            continue
        a, b = torch.load(ref_state, weights_only=True), torch.load(got_state, weights_only=True)
        for name in sorted(set(a) | set(b)):
            if name not in a or name not in b:
                report.tensor_differences.append(f"rank {rank}: {name} only in one run")
            elif not torch.equal(a[name], b[name]):
                diff = (a[name].double() - b[name].double()).abs().max().item() if a[name].is_floating_point() else float("nan")
                report.tensor_differences.append(f"rank {rank}: {name} differs (max |diff| {diff:.3g})")


# ----------------------------------------------------------------------------------------------------
# The worker: one process (or rank 0 of a DDP group) of one run.
# ----------------------------------------------------------------------------------------------------
def worker(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preemptible.tools.checking")
    p.add_argument("--factory", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--trace", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--signal", default="USR1")
    p.add_argument("--signal-at", default=None)
    args = p.parse_args(argv)

    import pytorch_lightning as pl

    from preemptible import PreemptionCallback
    from preemptible.core.signals import parse_signal
    from preemptible.tools.tracing import SignalAtStep, StepRecorder

    pl.seed_everything(args.seed, workers=True, verbose=False)
    made = load_factory(args.factory)()
    if not (isinstance(made, tuple) and len(made) == 3):
        raise TypeError(f"{args.factory} must return (LightningModule, datamodule_or_dataloaders, trainer_kwargs)")
    model, data, kwargs = made
    kwargs = dict(kwargs or {})
    cb = PreemptionCallback(run_dir=args.run_dir)
    callbacks = [cb, StepRecorder(args.trace, params=True, final_state=True), *kwargs.pop("callbacks", [])]
    if args.signal_at is not None:
        callbacks.append(SignalAtStep([args.signal_at], signum=parse_signal(args.signal)))
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    if args.ranks > 1:
        kwargs.setdefault("strategy", "ddp")
    trainer = pl.Trainer(devices=args.ranks, max_steps=args.steps, callbacks=callbacks, **kwargs)
    fit_kwargs: dict[str, Any] = {"ckpt_path": cb.resume_path()}
    if isinstance(data, pl.LightningDataModule):
        fit_kwargs["datamodule"] = data
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        fit_kwargs["train_dataloaders"], fit_kwargs["val_dataloaders"] = data
    else:
        fit_kwargs["train_dataloaders"] = data
    trainer.fit(model, **fit_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(worker())
