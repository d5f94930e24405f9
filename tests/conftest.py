from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import example_command  # noqa: E402

from preemptible.tools.testing import run_preempted  # noqa: E402

# Child processes must not inherit a run directory from the developer's shell.
os.environ.pop("PREEMPTIBLE_RUN_DIR", None)
os.environ.pop("SLURM_JOB_ID", None)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """An uninterrupted run's record for a configuration, computed once per session and shared."""
    cache: dict[tuple[Any, ...], Path] = {}

    def get(**config: Any) -> Path:
        key = tuple(sorted(config.items()))
        if key not in cache:
            base = tmp_path_factory.mktemp("reference")
            record = base / "record.jsonl"
            summary = run_preempted(example_command(record, **config), run_dir=base / "run", timeout=240,
                                    log=base / "log.txt")
            assert summary.exit_code == 0, (base / "log.txt").read_text()[-3000:]
            cache[key] = record
        return cache[key]

    return get
