"""Shared test helpers: build example-training commands and compare their loss records."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from preemptible.examples.train import options_to_argv

PYTHON = sys.executable


def example_command(record: Path, max_steps: int = 24, devices: int = 1, **options: Any) -> list[str]:
    return [PYTHON, "-m", "preemptible.examples.train", "--max-steps", str(max_steps), "--devices", str(devices),
            "--record", str(record), *options_to_argv(**options)]


def load_record(path: Path) -> tuple[dict[tuple[Any, ...], str], list[tuple[Any, ...]], dict[int, str]]:
    """(loss by (kind, rank, epoch, batch, step), duplicated keys, final weight digest by rank)."""
    losses: dict[tuple[Any, ...], str] = {}
    duplicates: list[tuple[Any, ...]] = []
    final: dict[int, str] = {}
    for line in Path(path).read_text().splitlines():
        entry = json.loads(line)
        if entry["kind"] == "final":
            final[entry["rank"]] = entry["weights"]
            continue
        key = (entry["kind"], entry["rank"], entry["epoch"], entry["batch"], entry["step"])
        if key in losses:
            duplicates.append(key)
        losses[key] = entry["loss"]
    return losses, duplicates, final


def assert_same_as_reference(record: Path, reference: Path) -> int:
    """Every training/validation loss and the final weights are bitwise equal; nothing replayed or skipped.

    Returns the number of compared losses.
    """
    got, dup, got_final = load_record(record)
    want, _, want_final = load_record(reference)
    assert not dup, f"batches trained twice (replayed after resume): {dup[:5]}"
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing, f"batches never trained (skipped after resume): {missing[:5]}"
    assert not extra, f"batches the reference never trained: {extra[:5]}"
    differ = [k for k in sorted(want) if got[k] != want[k]]
    assert not differ, f"{len(differ)} losses differ from the uninterrupted run, first at {differ[0]}: {got[differ[0]]} vs {want[differ[0]]}"
    assert got_final and got_final == want_final, f"final weights differ: {got_final} vs {want_final}"
    return len(want)
