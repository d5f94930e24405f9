"""The Hydra app (preemptible/examples/hydra_app) under ``preemptible run``, as the README shows it:
callbacks and the W&B logger instantiated from config, preempted by a real signal, relaunched by the
local supervisor, resumed bitwise in the same Hydra output directory with one W&B run id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import assert_same_as_reference

from preemptible.core.schema import RECORD_FILE, Event, RunRecordKey, read_events

STEPS = 40
APP = [sys.executable, "-m", "preemptible.examples.hydra_app.train"]


def test_hydra_app_preempted_under_preemptible_run_resumes_in_its_run_dir(tmp_path: Path, reference_run) -> None:
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    command = [sys.executable, "-m", "preemptible.cli", "run", "--run-dir", str(run_dir), "--preempt-at-step", "10",
               "--", *APP, f"trainer.max_steps={STEPS}", "logger=wandb", "model.step_sleep=0.1", "slow_attempts=1",
               "+callbacks.record._target_=preemptible.tools.tracing.StepRecorder", f"+callbacks.record.path={record}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, output

    events = list(read_events(run_dir / "events.jsonl"))
    stops = [e["step"] for e in events if e["event"] == Event.STOP_AGREED]
    starts = [e["step"] for e in events if e["event"] == Event.TRAIN_START]
    assert len(stops) == 1 and 10 <= stops[0] < STEPS and starts == [0, stops[0]], (stops, starts, output)
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=1))

    # Hydra's output directory is the run directory for both attempts: nothing else was created.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.jsonl", "run"], list(tmp_path.iterdir())
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert Path(hydra_cfg["runtime"]["output_dir"]) == run_dir
    # one W&B run: every attempt's offline run carries the id recorded in run.json
    loggers = json.loads((run_dir / RECORD_FILE).read_text())[RunRecordKey.LOGGERS]
    wandb_id = loggers["0:WandbLogger"]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(wandb_id) for r in runs), (wandb_id, runs)


def test_run_dir_resolver_prefers_the_launcher_then_the_default_then_the_slurm_job() -> None:
    import pytest
    from omegaconf import OmegaConf

    from preemptible.core.environment import JobEnvironment
    from preemptible.core.rundir import RunDirError
    from preemptible.scheduler.hydra import register_resolvers, run_dir_for_config

    def env(**variables: str) -> JobEnvironment:
        return JobEnvironment.from_env(variables)

    assert run_dir_for_config("runs/x", env(PREEMPTIBLE_RUN_DIR="/r", SLURM_JOB_ID="7")) == "/r"
    assert run_dir_for_config("runs/x", env(SLURM_JOB_ID="7")) == "runs/x"
    assert run_dir_for_config(None, env(SLURM_JOB_ID="7", SLURM_ARRAY_JOB_ID="6", SLURM_ARRAY_TASK_ID="1")) == "runs/6_1"
    with pytest.raises(RunDirError, match=r"Give a default, e.g. hydra.run.dir: \$\{preemptible.run_dir:runs/"):
        run_dir_for_config(None, env())
    register_resolvers()
    register_resolvers()  # twice is fine
    assert OmegaConf.create({"d": "${preemptible.run_dir:runs/fallback}"}).d == "runs/fallback"  # (no PREEMPTIBLE_RUN_DIR)
