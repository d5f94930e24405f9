"""torchrun's elastic agent: the callback tells, at start, when the agent would die of a stop signal
instead of passing it on, and names the fix (the cluster run is tests/slurm/test_torchrun_slurm.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from preemptible.core.elastic import AGENT_SIGNALS_FIX, agent_signals, elastic_agent_warning
from preemptible.core.environment import JobEnvironment
from preemptible.core.signals import DEFAULT_SIGNALS

WORKER = {"TORCHELASTIC_RUN_ID": "none", "RANK": "0", "LOCAL_RANK": "0"}


def test_warning_names_the_signals_the_agent_drops_and_the_fix() -> None:
    assert elastic_agent_warning(JobEnvironment.from_env({}), DEFAULT_SIGNALS) is None, "not under torchrun"
    # an agent that exports nothing handles torchrun's default set
    for env in (WORKER, {**WORKER, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT"}):
        message = elastic_agent_warning(JobEnvironment.from_env(env), DEFAULT_SIGNALS)
        assert message is not None and "does not handle SIGUSR1, SIGUSR2" in message, message
        assert f"--signals-to-handle={AGENT_SIGNALS_FIX}" in message and "--shutdown-timeout" in message
        assert "plain srun" in message
    fixed = JobEnvironment.from_env({**WORKER, "TORCHELASTIC_SIGNALS_TO_HANDLE": AGENT_SIGNALS_FIX})
    assert elastic_agent_warning(fixed, DEFAULT_SIGNALS) is None
    assert {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM} <= agent_signals(fixed)
    # only the signals the run listens to count
    usr1 = JobEnvironment.from_env({**WORKER, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM, SIGUSR1,NOSUCH"})
    assert elastic_agent_warning(usr1, (signal.SIGUSR1, signal.SIGTERM)) is None
    assert "does not handle SIGUSR2 " in (elastic_agent_warning(usr1, DEFAULT_SIGNALS) or "")


def test_a_real_torchrun_worker_warns_at_start_and_trains(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "preemptible.examples.train", "--max-steps", "2", "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchrun, whose elastic agent does not handle SIGUSR1, SIGUSR2" in done.stderr, done.stderr[-3000:]
    assert "training finished at global step 2" in done.stdout
