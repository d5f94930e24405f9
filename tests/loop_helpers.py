"""Running the example loops (``preemptible.examples.fabric_loop`` / ``torch_loop``) uninterrupted and preempted.

Each run is real processes under the local supervisor (``preemptible.tools.testing.run_preempted``)
with real signals; the uninterrupted reference is the same command without a signal. A 2-rank
plain loop is started the way ``srun`` starts ranks (``tests/scripts/launch_ranks.py``); a 2-rank
Fabric loop starts its second rank itself (``Fabric(devices=2)``, what users do).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from preemptible.core.schema import Event, TraceKind, read_events, read_trace
from preemptible.tools.simulator import Preemption, RunSummary
from preemptible.tools.testing import assert_resumed_on_same_step, run_preempted

LAUNCH_RANKS = Path(__file__).parent / "scripts" / "launch_ranks.py"
TIMEOUT = 180


def loop_command(kind: str, run_dir: Path, trace: Path, *, ranks: int = 1, steps: int = 40,
                 options: Sequence[str] = ()) -> list[str]:
    """The command of one run of the ``kind`` ("fabric" or "torch") example loop."""
    module = {"fabric": "preemptible.examples.fabric_loop", "torch": "preemptible.examples.torch_loop"}[kind]
    command = [sys.executable, "-m", module, "--run-dir", str(run_dir), "--trace", str(trace),
               "--max-steps", str(steps), *options]
    if kind == "fabric":
        return [*command, "--devices", str(ranks)]
    if ranks > 1:
        return [sys.executable, str(LAUNCH_RANKS), str(ranks), *command, "--ddp"]
    return command


def run_loop(tmp_path: Path, name: str, kind: str, *, ranks: int = 1, steps: int = 40, options: Sequence[str] = (),
             plan: Sequence[Preemption] = ()) -> tuple[RunSummary, Path, Path]:
    """One run; returns its summary, trace and run directory. Fails with the log's tail if it did not finish."""
    run_dir, trace, log = tmp_path / name, tmp_path / f"{name}.jsonl", tmp_path / f"{name}.log"
    summary = run_preempted(loop_command(kind, run_dir, trace, ranks=ranks, steps=steps, options=options),
                            run_dir=run_dir, plan=plan, timeout=TIMEOUT, log=log)
    assert summary.exit_code == 0, f"{name}: exit code {summary.exit_code}\n" + log.read_text()[-4000:]
    return summary, trace, run_dir


def assert_bitwise_resumed(summary: RunSummary, trace: Path, reference: Path, run_dir: Path, *, ranks: int,
                           steps: int, preemptions: int) -> list[dict[str, Any]]:
    """Preempted ``preemptions`` times, each attempt resumed on the step the last stopped at, every rank's loss
    at every step and the final weights bitwise those of the reference, no step trained twice or skipped."""
    assert_resumed_on_same_step(summary, min_preemptions=preemptions)
    assert len(summary.attempts) == preemptions + 1, [a.exit_code for a in summary.attempts]
    want, got = read_trace(reference), read_trace(trace)
    assert not got.duplicates, f"steps trained twice after a resume: {got.duplicates[:5]}"
    for rank in range(ranks):
        trained = sorted(key[4] for key in got.entries if key[0] == TraceKind.TRAIN and key[1] == rank)
        assert trained == list(range(1, steps + 1)), f"rank {rank} trained steps {trained}"
    assert got.losses == want.losses, [k for k in want.losses if got.losses.get(k) != want.losses[k]][:5]
    assert set(got.final) == set(range(ranks)) and got.final == want.final, (got.final, want.final)
    attempts = {e["attempt"] for e in got.entries.values()}
    assert attempts == set(range(preemptions + 1)), f"attempts that trained: {attempts}"
    events = list(read_events(run_dir))
    assert events[-1]["event"] == Event.FINISH and events[-1]["step"] == steps
    return events
