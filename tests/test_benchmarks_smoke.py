"""The benchmarks run end to end (``benchmarks/run_all.py --quick``) and write their tables.

Only that: no timing is asserted here (the numbers of a --quick run on a shared machine mean nothing);
``make bench`` measures for real and writes ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = [
    "## 1. Steady-state overhead per step",
    "## 2. Emergency save",
    "## 3. Resume",
    "## 4. Against the alternatives",
    "## 5. Growth",
    "## 6. The grace window",
    "## 7. Periodic checkpoints",
    "## 8. Signal → committed, wherever the signal lands",
]


@pytest.mark.timeout(420)
def test_quick_benchmarks_write_every_table(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    text = out.read_text()
    assert "--quick run" in text
    for heading in SECTIONS:
        assert heading in text, f"missing section {heading!r}"
    assert "FAILED" not in text
    for needle in ("| torch |", "| pytorch-lightning |", "| filesystem (checkpoints) |", "Command: `",
                   "Per-step time against a plain Trainer",
                   "Fabric loop: per-step time", "÷ raw", "Where the difference goes", "steps lost",
                   "Save, resume and per-step overhead by state size", "Largest state saved within 25 s",
                   "Training time lost per periodic checkpoint", "Signal → committed by location"):
        assert needle in text, f"missing {needle!r}"
    # Every table has a header row and at least one data row.
    tables = [block for block in text.split("\n\n") if block.lstrip().startswith("| ")]
    assert len(tables) >= 8
    assert all(len(block.strip().splitlines()) >= 3 for block in tables)
