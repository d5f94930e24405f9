"""The doors a Lightning user comes through (issue: every door): both packages, LightningCLI + YAML,
attach-and-forget resume, bad input at each door.

Real processes and real signals throughout: the README's script and its LightningCLI ``main.py`` +
``config.yaml`` (taken from README.md by heading, so the README cannot drift) are preempted by a
signal from the supervisor, relaunched with the same command (no ``ckpt_path``), and compared bitwise
with an uninterrupted run of the example. The ``lightning`` package's runs never import
``pytorch_lightning`` (their commit records name only ``lightning``), and vice versa.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import PYTHON, assert_same_as_reference, example_command, readme_blocks
from test_exact_resume import _scenario

from preemptible.core.schema import COMMIT_SUFFIX, Event, read_events
from preemptible.tools.testing import assert_resumed_on_same_step, run_preempted

STEPS = 12
SLEEP = 0.05  # per step: the supervisor's signal lands while training still runs
SCRIPTS = Path(__file__).parent / "scripts"
ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = {"lightning": "lightning", "pytorch_lightning": "pytorch-lightning"}
NAMESPACES = [pytest.param("lightning", id="lightning"), pytest.param("pytorch_lightning", id="pytorch_lightning")]

#: The example's trainer settings (preemptible/examples/train.py), so that a LightningCLI run of the
#: README's main.py computes what the uninterrupted reference run of the example computes.
REFERENCE_SETTINGS = """\
seed_everything: 1234
trainer:
  accelerator: cpu
  devices: 1
  deterministic: true
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {save_dir: logs, name: cli}
model:
  step_sleep: 0.05
data:
  samples: 256
"""


def _for(namespace: str, text: str) -> str:
    """The README's code (written for ``lightning``) for ``namespace``."""
    return text if namespace == "lightning" else text.replace("lightning.pytorch", "pytorch_lightning")


def _readme_cli(tmp_path: Path, namespace: str) -> list[list[str]]:
    """Write the README's main.py and config.yaml into ``tmp_path``; return its commands' arguments (after ``main.py``)."""
    blocks = readme_blocks("LightningCLI and YAML")
    main = next(code for lang, code in blocks if lang == "python")
    config = next(code for lang, code in blocks if lang == "yaml")
    commands = [shlex.split(line, comments=True) for lang, code in blocks if lang == "bash" for line in code.splitlines()]
    (tmp_path / "main.py").write_text(_for(namespace, main))
    (tmp_path / "config.yaml").write_text(config)
    (tmp_path / "reference.yaml").write_text(_for(namespace, REFERENCE_SETTINGS))
    assert all(c[:3] == ["python", "main.py", "fit"] for c in commands if c), commands
    return [c[2:] for c in commands if c]


def _versions(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text())["versions"] for p in (run_dir / "checkpoints").glob(f"*{COMMIT_SUFFIX}")]


def _only_package_in_use(run_dir: Path, namespace: str) -> None:
    versions = _versions(run_dir)
    assert versions, f"no committed checkpoint in {run_dir}"
    other = DISTRIBUTION["lightning" if namespace == "pytorch_lightning" else "pytorch_lightning"]
    for v in versions:
        assert DISTRIBUTION[namespace] in v and other not in v, f"commit record names {v}: expected only {namespace}"


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_lightningcli_preempted_relaunched_without_ckpt_path_resumes_bitwise(
        tmp_path: Path, namespace: str, reference_run, monkeypatch: pytest.MonkeyPatch) -> None:
    """lightning: the README's YAML callback entry; pytorch_lightning: the README's ``--trainer.callbacks+=`` form.
    A real signal (SIGTERM / SIGUSR1), the same command again (no --ckpt_path), bitwise equal to the
    uninterrupted run; SaveConfigCallback accepts the identical relaunch; a changed relaunch with an older
    explicit --ckpt_path loads that one, warns, and keeps the saved config.yaml."""
    monkeypatch.chdir(tmp_path)
    yaml_form, plus_form, _ = _readme_cli(tmp_path, namespace)
    record = tmp_path / "record.jsonl"
    if namespace == "lightning":
        args, run_dir, signal = [*yaml_form, "--config", "reference.yaml"], tmp_path / "runs/cli-exp1", "TERM"
    else:
        args, run_dir, signal = [plus_form[0], "--config", "reference.yaml", *plus_form[1:]], tmp_path / "runs/cli-exp2", "USR1"
    args += [f"--trainer.max_steps={STEPS}",
             "--trainer.callbacks+=preemptible.tools.tracing.StepRecorder", f"--trainer.callbacks.path={record}"]
    summary = run_preempted([PYTHON, "main.py", *args], run_dir=run_dir, at_step=4, signal=signal, timeout=180,
                            log=tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert summary.exit_code == 0 and summary.preemptions == 1, log[-4000:]
    assert_resumed_on_same_step(summary)
    assert_same_as_reference(record, reference_run(max_steps=STEPS))
    _only_package_in_use(run_dir, namespace)
    versions = sorted((tmp_path / "logs/cli").iterdir())
    assert [v.name for v in versions] == ["version_0"], "the relaunch logs into the run's first log version"
    saved = versions[0] / "config.yaml"
    before = saved.read_bytes()
    assert not list(versions[0].glob("config.relaunch-*")), "an identical relaunch writes no second config"

    # A relaunch with different settings and an older checkpoint named explicitly: that checkpoint wins.
    older = next(e["path"] for e in read_events(run_dir / "events.jsonl") if e["event"] == Event.CHECKPOINT)
    changed = [a for a in args if not a.startswith("--trainer.callbacks.path")] + [
        f"--trainer.callbacks.path={tmp_path / 'changed.jsonl'}", f"--trainer.max_steps={STEPS + 2}", f"--ckpt_path={older}"]
    out = subprocess.run([PYTHON, "main.py", *changed], capture_output=True, text=True, timeout=180)
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-4000:]
    assert f"Restoring states from the checkpoint path at {older}" in output, output[-4000:]
    assert "holds a newer committed checkpoint" in output, output[-4000:]
    assert "differs from the one the run started with" in output and "trainer.max_steps" in output, output[-4000:]
    assert saved.read_bytes() == before, "the saved config.yaml is never overwritten"
    assert f"max_steps: {STEPS + 2}" in (versions[0] / "config.relaunch-1.yaml").read_text()


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_lightningcli_help_and_bad_input(tmp_path: Path, namespace: str) -> None:
    """One process, several LightningCLI calls: --help shows the documented arguments; a YAML value of the
    wrong type, an unknown signal name, an invalid keep and a run_dir that is a file are refused naming the
    problem, before anything is written (the file stays as it was)."""
    commands = _readme_cli(tmp_path, namespace)
    config = (tmp_path / "config.yaml").read_text()
    bad = {
        "wrong_type": config.replace("every_n_minutes: 30", "every_n_minutes: soon"),
        "unknown_signal": config.replace("signals: [USR1, TERM]", "signals: [USR1, TREM]"),
        "keep": config.replace("every_n_minutes: 30", "keep: 1"),
        "run_dir_file": config.replace("run_dir: runs/cli-exp1", f"run_dir: {tmp_path / 'afile'}"),
    }
    (tmp_path / "afile").write_text("precious")
    cases: dict[str, list[str]] = {"help": commands[2]}
    for name, text in bad.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        cases[name] = ["fit", "--config", str(tmp_path / f"{name}.yaml"), "--config", str(tmp_path / "reference.yaml"),
                       "--trainer.max_steps=2"]
    out = subprocess.run([PYTHON, str(SCRIPTS / "cli_cases.py"), namespace, str(tmp_path / "main.py"), json.dumps(cases)],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    results = {r["case"]: r for r in map(json.loads, filter(None, out.stdout.splitlines()))}
    assert set(results) == set(cases), out.stdout[-3000:] + out.stderr[-3000:]
    said = {name: r["output"] + r["error"] for name, r in results.items()}

    assert results["help"]["exit"] == 0
    for doc in ("the run's directory, the same for every restart", 'signals that mean "stop soon", by name',
                "default: ('USR1', 'TERM', 'USR2')"):
        assert doc in said["help"], said["help"][-3000:]
    assert results["wrong_type"]["exit"] == 2 and "every_n_minutes" in said["wrong_type"], said["wrong_type"][-2000:]
    assert results["unknown_signal"]["exit"] != 0 and "unknown signal 'TREM'" in said["unknown_signal"] \
        and "USR1" in said["unknown_signal"], said["unknown_signal"][-2000:]
    assert results["keep"]["exit"] != 0 and "keep=1: at least 2" in said["keep"], said["keep"][-2000:]
    assert results["run_dir_file"]["exit"] == "RunDirError", said["run_dir_file"][-2000:]
    assert "is a file, not a directory" in said["run_dir_file"]
    assert (tmp_path / "afile").read_text() == "precious"


def test_readme_script_resumes_without_ckpt_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's script (``import lightning.pytorch``, default Trainer, fit without ckpt_path), with the
    example model: preempted by a real SIGUSR1, relaunched as it is, it continues on the step it stopped at."""
    monkeypatch.chdir(tmp_path)
    (code,) = [code for lang, code in readme_blocks("In a script") if lang == "python"]
    prelude = ("from preemptible.examples.models import BlobsData, TinyModel\n"
               "model, dm = TinyModel(step_sleep=0.02), BlobsData(samples=128)\n")
    lines = code.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("from preemptible import")) + 1
    (tmp_path / "train.py").write_text("".join(lines[:at]) + prelude + "".join(lines[at:]))
    summary = run_preempted([PYTHON, "train.py"], run_dir=tmp_path / "runs/exp1", at_step=5, timeout=180,
                            log=tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert summary.exit_code == 0 and summary.preemptions == 1, log[-4000:]
    assert_resumed_on_same_step(summary)
    finish = [e["step"] for e in read_events(tmp_path / "runs/exp1/events.jsonl") if e["event"] == Event.FINISH]
    assert finish == [3 * 128 // 16], "three epochs of 8 batches, each trained once"
    _only_package_in_use(tmp_path / "runs/exp1", "lightning")


@pytest.mark.ddp
def test_lightning_package_ddp_sigterm_to_one_rank(tmp_path: Path, reference_run) -> None:
    """``import lightning`` only, 2-rank DDP, SIGTERM to rank 1 only, fit without ckpt_path: both ranks stop on
    one step and the relaunch continues bitwise (the pytorch_lightning reference run computes the same numbers)."""
    record = tmp_path / "record.jsonl"
    cmd = example_command(record, max_steps=STEPS, devices=2, step_sleep=SLEEP, namespace="lightning", no_ckpt_path=True)
    summary = run_preempted(cmd, run_dir=tmp_path / "run", at_step=5, signal="TERM", target="rank:1", timeout=180,
                            log=tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert summary.exit_code == 0 and summary.preemptions == 1, log[-4000:]
    assert_resumed_on_same_step(summary)
    assert_same_as_reference(record, reference_run(max_steps=STEPS, devices=2))
    _only_package_in_use(tmp_path / "run", "lightning")
    resumes = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == Event.RESUME]
    assert resumes and all(e["checkpoint"] for e in resumes), "the relaunch resumed by itself, on every rank"


def test_exactness_under_the_lightning_package(tmp_path: Path, reference_run) -> None:
    """A subset of tests/test_exact_resume.py under ``import lightning`` with fit(ckpt_path=None): a stop on a step
    where validation is due and one during validation (OneCycleLR), bitwise equal to the reference."""
    options, points, steps = _scenario("validation", 1)
    record = tmp_path / "record.jsonl"
    cmd = example_command(record, max_steps=steps, namespace="lightning", no_ckpt_path=True, **options)
    for point in points:
        cmd += ["--signal-at", point]
    summary = run_preempted(cmd, run_dir=tmp_path / "run", timeout=180, log=tmp_path / "log.txt")
    assert summary.exit_code == 0 and summary.preemptions == len(points), (tmp_path / "log.txt").read_text()[-4000:]
    assert_resumed_on_same_step(summary)
    assert [a.stop_step for a in summary.attempts[:-1]][0] == 4
    assert_same_as_reference(record, reference_run(max_steps=steps, **options))
    _only_package_in_use(tmp_path / "run", "lightning")


NAMESPACE_CHECKS = r"""
import sys
import preemptible
from preemptible import PreemptionCallback as Neutral
assert not {"lightning", "pytorch_lightning"} & set(sys.modules), "importing preemptible imported Lightning"
import lightning.pytorch as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from preemptible.lightning import hooks, saving
cb = Neutral(run_dir=sys.argv[1])  # named before Lightning was imported: becomes the lightning.pytorch one
assert type(cb) is preemptible.PreemptionCallback and isinstance(cb, L.Callback), type(cb).__mro__
assert "pytorch_lightning" not in sys.modules
import os  # a one-task SLURM job's variables, for Lightning's SLURMEnvironment (nothing is submitted)
os.environ.update(SLURM_NTASKS="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_JOB_ID="1",
                  SLURM_NODELIST="localhost", SLURM_JOB_NAME="checks")
trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=1, plugins=[SLURMEnvironment(auto_requeue=True)], logger=False)
assert hooks.disable_lightning_auto_requeue(trainer) and not trainer.strategy.cluster_environment.auto_requeue
assert saving.streams_with_torch_save(trainer.strategy)
import pytorch_lightning as PL
both = preemptible.PreemptionCallback
assert issubclass(both, L.Callback) and issubclass(both, PL.Callback), both.__mro__
import preemptible.lightning.pytorch_lightning as pinned
pl_trainer = PL.Trainer(accelerator="cpu", logger=False)
assert saving.streams_with_torch_save(pl_trainer.strategy)
assert not issubclass(pinned.PreemptionCallback, L.Callback)
print("namespace checks passed")
"""


def test_which_callback_class_and_which_package_the_checks_use(tmp_path: Path) -> None:
    out = subprocess.run([PYTHON, "-c", NAMESPACE_CHECKS, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "namespace checks passed" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


def _as_other_user() -> list[str]:
    """A prefix that runs a command as a user who is not root (root writes anywhere), or nothing when we are not root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root: setpriv (util-linux) is needed to test an unwritable run_dir as another user"
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_bad_run_dirs_are_refused_naming_the_fix() -> None:
    """A file, a path under a file, an unwritable directory (as a non-root user), a read-only filesystem
    (a read-only tmpfs in a private mount namespace): clear errors, nothing created or changed."""
    base = Path(tempfile.mkdtemp(prefix="preemptible-bad-run-dirs-"))  # under /tmp: reachable by the other user
    try:
        _check_bad_run_dirs(base)
    finally:
        base.chmod(0o700)
        (base / "locked").chmod(0o700)
        shutil.rmtree(base)


def _check_bad_run_dirs(base: Path) -> None:
    base.chmod(0o755)
    (base / "afile").write_text("precious")
    locked = base / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    script = str(SCRIPTS / "bad_run_dirs.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    paths = [base / "afile", base / "afile/run", locked, locked / "run"]
    out = subprocess.run([*_as_other_user(), PYTHON, script, *map(str, paths)], capture_output=True, text=True,
                         timeout=120, env=env, cwd=base)
    said = dict(line.split("\t", 1) for line in out.stdout.splitlines())
    assert set(said) == set(map(str, paths)), out.stdout + out.stderr[-3000:]
    assert "RunDirError" in said[str(paths[0])] and "is a file, not a directory" in said[str(paths[0])]
    assert "RunDirError" in said[str(paths[1])] and "afile is a file" in said[str(paths[1])]
    for path in paths[2:]:
        assert "RunDirError" in said[str(path)] and "is not writable by this user" in said[str(path)], said[str(path)]
        assert "Point run_dir at a writable directory" in said[str(path)]
    assert (base / "afile").read_text() == "precious" and not any(locked.iterdir())

    mount_point = base / "ro"
    mount_point.mkdir()
    inner = f"mount -t tmpfs -o ro none {shlex.quote(str(mount_point))} && exec {shlex.quote(PYTHON)} {script} " \
            f"{shlex.quote(str(mount_point / 'run'))}"
    out = subprocess.run(["unshare", "-rm", "sh", "-c", inner], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "is on a read-only filesystem" in out.stdout and "RunDirError" in out.stdout, out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize("argv,command", [
    (["sbatch", "--bogus", "--", "python", "t.py"], "sbatch"),
    (["run", "--bogus", "--", "python", "t.py"], "run"),
    (["status", "--bogus", "runs/x"], "status"),
])
def test_cli_errors_name_the_command(argv: list[str], command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from preemptible.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"preemptible {command}: error: unrecognized arguments: --bogus" in err, err
