"""Exact continuation: after preemptions at awkward points, every loss and the final weights are
bitwise those of an uninterrupted run (issue: exact continuation).

The matrix is (1 process, 2-rank DDP) x (num_workers 0, 2) x three runs that each hold several
preemption points — one relaunch per point keeps the number of process launches (each pays ~4 s
of imports) reasonable:

* positions: before the first batch, mid-epoch, on the last batch of an epoch (three preemptions in one run);
* validation: on a step where validation is due, and during validation (with OneCycleLR sized by
  ``trainer.estimated_stepping_batches``, which makes Lightning build the loaders early);
* accumulation: inside a gradient-accumulation window.

The dataset adds fresh random noise in ``__getitem__``, the model has dropout and BatchNorm, the
loader is a plain ``DataLoader(shuffle=True)`` (Lightning injects ``DistributedSampler`` under DDP).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_same_as_reference, example_command, load_record

from preemptible.core.schema import TraceKind
from preemptible.tools.testing import assert_resumed_on_same_step, run_preempted

COMBOS = [
    pytest.param(1, 0, id="1proc-w0"),
    pytest.param(1, 2, id="1proc-w2"),
    pytest.param(2, 0, id="ddp2-w0", marks=pytest.mark.ddp),
    pytest.param(2, 2, id="ddp2-w2", marks=pytest.mark.ddp),
]


def _batches_per_epoch(devices: int) -> int:
    return 256 // 16 // devices  # samples / batch size / ranks


def _scenario(name: str, devices: int) -> tuple[dict, list[str], int]:
    """(options, signal points per attempt, max_steps)

    A signal sent right after step N is noticed at the boundary of step N + 1; the stop is agreed
    there with one process and one step later under DDP (the non-blocking agreement).
    """
    per_epoch = _batches_per_epoch(devices)
    latency = 1 if devices > 1 else 0
    if name == "positions":
        last_of_second_epoch = 2 * per_epoch
        # "0": before the first batch; "5": mid-epoch; the third is timed so that the stop is agreed
        # exactly on the epoch's last batch.
        return {}, ["0", "5", str(last_of_second_epoch - 1 - latency)], last_of_second_epoch + 6
    if name == "validation":
        # validation every 4 batches: the stop agreed at step 4 is a step where validation is due;
        # "v8" signals while validation of step 8 runs.
        return {"val_every": 4, "onecycle": True}, [str(3 - latency), "v8"], 14
    if name == "accumulation":
        return {"accumulate": 2}, ["3+"], 9
    raise ValueError(name)


@pytest.mark.parametrize("devices,workers", COMBOS)
@pytest.mark.parametrize("scenario", ["positions", "validation", "accumulation"])
def test_bitwise_identical_after_preemption(tmp_path: Path, devices: int, workers: int, scenario: str, reference_run) -> None:
    options, points, steps = _scenario(scenario, devices)
    options = dict(options, num_workers=workers)
    record = tmp_path / "record.jsonl"
    cmd = example_command(record, max_steps=steps, devices=devices, **options)
    for point in points:
        cmd += ["--signal-at", point]
    summary = run_preempted(cmd, run_dir=tmp_path / "run", timeout=180, log=tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert summary.exit_code == 0, log[-4000:]
    assert summary.preemptions == len(points), log[-4000:]
    assert_resumed_on_same_step(summary)
    if scenario == "positions":
        stops = [a.stop_step for a in summary.attempts[:-1]]
        assert stops[0] == 0, "a signal before the first batch stops before any step"
        per_epoch = _batches_per_epoch(devices)
        # the stop agreed on the epoch's last batch moves to the next step boundary (see README)
        assert stops[2] == 2 * per_epoch + 1
    if scenario == "validation":
        stops = [a.stop_step for a in summary.attempts[:-1]]
        assert stops[0] == 4, "stopped on the step where validation was due (after running it)"
    assert_same_as_reference(record, reference_run(max_steps=steps, devices=devices, **options))
    # Not an empty comparison: every rank trained every batch of every optimizer step exactly once.
    trained = [key for key in load_record(record)[0] if key[0] == TraceKind.TRAIN]
    assert len(trained) == steps * devices * options.get("accumulate", 1)
    assert {key[1] for key in trained} == set(range(devices))


@pytest.mark.parametrize("devices", [pytest.param(1, id="1proc"), pytest.param(2, id="ddp2", marks=pytest.mark.ddp)])
def test_users_own_stateful_dataloader(tmp_path: Path, devices: int, reference_run) -> None:
    """torchdata's StatefulDataLoader (with StatefulDistributedSampler under DDP): each rank gets its own loader state back."""
    options = {"stateful_loader": True}
    steps = 2 * _batches_per_epoch(devices) + 4
    record = tmp_path / "record.jsonl"
    cmd = example_command(record, max_steps=steps, devices=devices, **options)
    cmd += ["--signal-at", "5", "--signal-at", str(steps - 6)]
    summary = run_preempted(cmd, run_dir=tmp_path / "run", timeout=180, log=tmp_path / "log.txt")
    assert summary.exit_code == 0 and summary.preemptions == 2, (tmp_path / "log.txt").read_text()[-4000:]
    assert_resumed_on_same_step(summary)
    assert_same_as_reference(record, reference_run(max_steps=steps, devices=devices, **options))
