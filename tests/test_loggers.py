"""Logger continuity: after a requeue, TensorBoard and CSV keep writing into the same version
directory and W&B (offline mode) resumes the same run id."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from helpers import example_command

from preemptible.core.schema import RECORD_FILE, RunRecordKey
from preemptible.tools.testing import run_preempted


def test_loggers_continue_in_the_same_version_and_run(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    cmd = example_command(tmp_path / "record.jsonl", max_steps=16, step_sleep=0.05, loggers="tensorboard,csv,wandb",
                          log_dir=logs)
    summary = run_preempted(cmd, run_dir=tmp_path / "run", at_step=6, timeout=180, log=tmp_path / "log.txt",
                            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert summary.exit_code == 0 and summary.preemptions == 1, (tmp_path / "log.txt").read_text()[-3000:]

    assert sorted(p.name for p in (logs / "tb").iterdir()) == ["version_0"], "no version_1 after the requeue"
    assert len(list((logs / "tb" / "version_0").glob("events.out.tfevents.*"))) == 2, "both attempts wrote to version_0"
    assert sorted(p.name for p in (logs / "csv").iterdir()) == ["version_0"]
    rows = list(csv.DictReader(open(logs / "csv" / "version_0" / "metrics.csv")))
    steps = sorted({int(r["step"]) for r in rows if r.get("train_loss")})
    assert steps[0] == 0 and steps[-1] == 15 and len(steps) == 16, f"metrics of both attempts in one file: {steps}"

    record = json.loads((tmp_path / "run" / RECORD_FILE).read_text())[RunRecordKey.LOGGERS]
    wandb_id = record["2:WandbLogger"]
    runs = list((logs / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(wandb_id) for r in runs), f"both attempts are run {wandb_id}: {runs}"
