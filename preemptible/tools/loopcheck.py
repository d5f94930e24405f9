"""``preemptible check --loop -- COMMAND``: does *your own* loop (Fabric or plain PyTorch) resume bit for bit?

The command is a training script built on :class:`preemptible.loop.PreemptibleLoop` or
:class:`preemptible.fabric.FabricLoop` that takes its run directory from ``$PREEMPTIBLE_RUN_DIR``
(the default when ``run_dir`` is not given). It is run twice by the local supervisor, as
``preemptible run`` runs it: uninterrupted, and with a real signal after step ``preempt_at`` and a
relaunch. No instrumentation is needed: what is compared is the final checkpoint both runs commit
at the end of training, which holds every registered object (model, optimizer, schedulers, your
counters) and every rank's RNG and data position, tensor by tensor and value by value.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from preemptible.core.schema import REASON_FINISHED, STATE_KEY
from preemptible.core.signals import parse_signal
from preemptible.core.store import CheckpointStore
from preemptible.tools.checking import run_reference_and_preempted
from preemptible.tools.simulator import Preemption

__all__ = ["check_loop_resume", "LoopCheckReport", "state_differences"]

#: Values in preemptible's entry that say when a save happened, not what was saved.
_TIMING_KEYS = frozenset({"signal_at"})


@dataclass
class LoopCheckReport:
    """The outcome of one loop check: identical or not, and which entries of the final state differ."""

    preempt_at: int
    stop_step: Optional[int] = None
    resumed_from_step: Optional[int] = None
    final_step: Optional[int] = None
    compared: int = 0
    differences: list[str] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def identical(self) -> bool:
        return self.error is None and not self.differences and self.compared > 0


def check_loop_resume(command: Sequence[str], preempt_at: int, workdir: os.PathLike[str] | str = "runs/check",
                      signal: str = "USR1", target: str = "tree", timeout: float = 600.0) -> LoopCheckReport:
    """Run ``command`` uninterrupted and preempted after step ``preempt_at``; compare their final checkpoints."""
    if preempt_at < 1:
        raise ValueError(f"--preempt-at {preempt_at}: give a step >= 1 (the loop must have trained before the signal)")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    report = LoopCheckReport(preempt_at=preempt_at)
    preemption = Preemption(at_step=preempt_at, signal=parse_signal(signal), target=target)
    for name in ("reference", "preempted"):
        shutil.rmtree(work / name, ignore_errors=True)
    summaries, report.error = run_reference_and_preempted(
        work, {"reference": (list(command), []), "preempted": (list(command), [preemption])}, timeout)
    if report.error:
        return report
    attempts = summaries["preempted"].attempts
    report.stop_step, report.resumed_from_step = attempts[0].stop_step, attempts[1].resumed_from_step
    if report.stop_step is None or report.stop_step != report.resumed_from_step:
        report.differences.append(f"attempt 1 resumed at step {report.resumed_from_step}, attempt 0 stopped at "
                                  f"{report.stop_step}")
    finals = {}
    for name in summaries:
        final = _final_checkpoint(work / name)
        if final is None:
            report.error = (f"the {name} run committed no final checkpoint in {work / name}: does the script take its "
                            "run directory from $PREEMPTIBLE_RUN_DIR, and leave the loop's `with` block normally?")
            return report
        finals[name] = final
    import torch

    reference = torch.load(finals["reference"][0], map_location="cpu", weights_only=True)
    resumed = torch.load(finals["preempted"][0], map_location="cpu", weights_only=True)
    report.final_step = finals["reference"][1]
    if finals["preempted"][1] != report.final_step:
        report.differences.append(f"the preempted run ended at step {finals['preempted'][1]}, "
                                  f"the uninterrupted one at {report.final_step}")
    report.compared, found = state_differences(reference, resumed)
    report.differences.extend(found)
    return report


def _final_checkpoint(run_dir: Path) -> Optional[tuple[Path, int]]:
    committed = CheckpointStore(run_dir / "checkpoints").committed()
    finished = [c for c in committed if c.record.reason == REASON_FINISHED]
    return (finished[-1].path, finished[-1].record.step) if finished else None


def state_differences(reference: Any, resumed: Any, where: str = "") -> tuple[int, list[str]]:
    """(leaves compared, one line per leaf that differs) between two checkpoint objects, by key path."""
    import torch

    if isinstance(reference, dict) and isinstance(resumed, dict):
        compared, found = 0, []
        # The registered objects first, preemptible's own entry (RNG, data position) last.
        for key in sorted(set(reference) | set(resumed), key=lambda k: (k == STATE_KEY, str(k))):
            path = f"{where}.{key}" if where else str(key)
            if key in _TIMING_KEYS and where.startswith(STATE_KEY):
                continue
            if key not in reference or key not in resumed:
                found.append(f"{path}: only in the {'uninterrupted' if key in reference else 'preempted'} run")
                continue
            n, more = state_differences(reference[key], resumed[key], path)
            compared, found = compared + n, found + more
        return compared, found
    if isinstance(reference, (list, tuple)) and isinstance(resumed, (list, tuple)):
        if len(reference) != len(resumed):
            return 1, [f"{where}: {len(reference)} items vs {len(resumed)}"]
        compared, found = 0, []
        for i, (a, b) in enumerate(zip(reference, resumed)):
            n, more = state_differences(a, b, f"{where}[{i}]")
            compared, found = compared + n, found + more
        return compared, found
    if isinstance(reference, torch.Tensor) and isinstance(resumed, torch.Tensor):
        if reference.shape == resumed.shape and reference.dtype == resumed.dtype and torch.equal(reference, resumed):
            return 1, []
        if reference.shape == resumed.shape and reference.is_floating_point() and resumed.is_floating_point():
            diff = (reference.double() - resumed.double()).abs().max().item()
            return 1, [f"{where}: differs (max |diff| {diff:.3g})"]
        return 1, [f"{where}: differs ({tuple(reference.shape)} {reference.dtype} vs {tuple(resumed.shape)} {resumed.dtype})"]
    if type(reference) is not type(resumed) or reference != resumed:
        return 1, [f"{where}: {reference!r} vs {resumed!r}"]
    return 1, []
