"""``preemptible sbatch``: template rendering, value checks, the CLI and submission (no cluster needed).

Submission to the real cluster is tested in tests/slurm/test_slurm_e2e.py, next to the fixture
that starts it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from preemptible import REQUEUE_EXIT_CODE
from preemptible.cli import main as cli_main
from preemptible.commands.sbatch import register
from preemptible.scheduler.slurm import (
    SubmitError,
    build_values,
    find_template,
    parse_time,
    placeholders,
    render_sbatch,
    submit,
)

COMMAND = ["python", "train.py", "--lr", "0.1"]


def render(name: str, **options) -> str:
    template = find_template(name).read_text()
    values = build_values(options.pop("command", COMMAND), run_dir=options.pop("run_dir", "/scratch/run"), **options)
    return render_sbatch(template, **{k: v for k, v in values.items() if k in placeholders(template)})


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


# --- render_sbatch --------------------------------------------------------------------------------
def test_render_substitutes_and_handles_conditional_lines() -> None:
    template = "a={{a}}\n{{?b}}b={{b}}\n{{?c}}c={{c}}\n{{?d}}d\nend\n"
    assert render_sbatch(template, a=1, b=None, c=0, d="") == "a=1\nc=0\nend\n"
    assert render_sbatch(template, a="x", b="y", c=None, d="z") == "a=x\nb=y\nd\nend\n"


@pytest.mark.parametrize("values, message", [
    ({"a": 1}, "{{b}}"),                 # missing value
    ({"a": 1, "b": 2, "zz": 3}, "{{zz}}"),  # value without placeholder
    ({"a": 1, "b": "x\ny"}, "newline"),
    ({"a": None, "b": 2}, "{{a}}"),       # None outside a conditional line
])
def test_render_is_strict(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        render_sbatch("{{a}}\n{{?b}}{{b}}\n", **values)


@pytest.mark.parametrize("template", ["{{Name}}", "{{ name }}", "{{name", "x }} y", "x {{?name}} y"])
def test_render_rejects_malformed_placeholders(template: str) -> None:
    with pytest.raises(ValueError, match="template line 1"):
        render_sbatch(template)


# --- the shipped templates ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["single", "ddp"])
def test_templates_have_the_requeue_essentials(name: str, tmp_path: Path) -> None:
    script = render(name, run_dir=tmp_path / "run", job_name="exp1", max_requeues=3)
    lines = sbatch_lines(script)
    assert "#SBATCH --requeue" in lines
    assert "#SBATCH --open-mode=append" in lines
    # No `B:`: every srun task, not only the batch shell, must get the warning.
    assert "#SBATCH --signal=USR1@120" in lines
    assert f"#SBATCH --output={tmp_path}/run/slurm-%j.out" in lines
    assert "#SBATCH --job-name=exp1" in lines
    assert f"export PREEMPTIBLE_RUN_DIR={tmp_path}/run" in script
    assert "export PREEMPTIBLE_MAX_REQUEUES=3" in script
    assert f'"$status" -eq {REQUEUE_EXIT_CODE}' in script
    assert "{{" not in script and "}}" not in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert shlex.split(srun)[-5:] == [*COMMAND, "&"]
    if shutil.which("bash"):
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize("name", ["single", "ddp"])
def test_optional_lines_are_omitted_when_unset(name: str) -> None:
    script = render(name)
    text = "\n".join(sbatch_lines(script))
    for option in ("--gpus-per-node", "--partition", "--time"):
        assert option not in text
    assert "PREEMPTIBLE_MAX_REQUEUES" not in script  # the callback's default applies


def test_ddp_template_layout() -> None:
    lines = sbatch_lines(render("ddp", nodes=2, ntasks_per_node=4, gpus_per_node=4, cpus_per_task=8,
                                partition="gpu", time="1-00:00:00", signal_lead=300))
    for expected in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
                     "--partition=gpu", "--time=1-00:00:00", "--signal=USR1@300"):
        assert f"#SBATCH {expected}" in lines


def test_command_is_shell_quoted() -> None:
    nasty = ["python", "-c", "print('$(rm -rf /)'); x=`id`", "a b", ";", "&&"]
    script = render("single", command=nasty)
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert shlex.split(srun)[-len(nasty) - 1:-1] == nasty


def test_max_requeues_zero_is_exported() -> None:
    assert "export PREEMPTIBLE_MAX_REQUEUES=0" in render("single", max_requeues=0)


# --- value checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("option, kwargs", [
    ("--job-name", {"job_name": "a;rm -rf"}),
    ("--job-name", {"job_name": "two\nlines"}),
    ("--job-name", {"job_name": "$(id)"}),
    ("--job-name", {"job_name": ""}),
    ("--partition", {"partition": "low high"}),
    ("--partition", {"partition": "low|x"}),
    ("--run-dir", {"run_dir": "/tmp/a b"}),
    ("--run-dir", {"run_dir": "/tmp/x;y"}),
    ("--run-dir", {"run_dir": "/tmp/x\ny"}),
    ("--run-dir", {"run_dir": "/tmp/$HOME"}),
    ("--run-dir", {"run_dir": "/tmp/run-%j"}),
    ("--nodes", {"nodes": 0}),
    ("--ntasks-per-node", {"ntasks_per_node": -1}),
    ("--cpus-per-task", {"cpus_per_task": 0}),
    ("--gpus-per-node", {"gpus_per_node": -1}),
    ("--signal-lead", {"signal_lead": 0}),
    ("--signal-lead", {"signal_lead": 70000}),
    ("--max-requeues", {"max_requeues": -1}),
    ("--time", {"time": "1h"}),
    ("--signal-lead", {"time": "2", "signal_lead": 120}),
])
def test_bad_values_are_rejected_naming_the_option(option: str, kwargs: dict) -> None:
    kwargs.setdefault("run_dir", "/tmp/run")
    with pytest.raises(ValueError, match=option):
        build_values(COMMAND, **kwargs)


def test_relative_run_dir_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert build_values(COMMAND, run_dir="runs/x")["run_dir"] == str(tmp_path / "runs" / "x")


def test_empty_command_is_rejected() -> None:
    with pytest.raises(ValueError, match="after '--'"):
        build_values([], run_dir="/tmp/run")


@pytest.mark.parametrize("text, seconds", [
    ("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-3", (2 * 24 + 3) * 3600),
    ("1-01:30", 86400 + 5400), ("1-00:00:10", 86410), ("UNLIMITED", None), ("infinite", None),
])
def test_parse_time_accepts_slurm_formats(text: str, seconds: int | None) -> None:
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1h", "1:2:3:4", "-5", "1-", "a"])
def test_parse_time_rejects_others(text: str) -> None:
    with pytest.raises(ValueError, match="--time"):
        parse_time(text)


# --- the CLI --------------------------------------------------------------------------------------
def test_cli_dry_run_prints_the_script(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = cli_main(["sbatch", "--dry-run", "--ntasks-per-node", "2", "--partition", "low", "--run-dir",
                   str(tmp_path / "r"), "--", "python", "train.py", "--devices", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --ntasks-per-node=2" in out  # --ntasks-per-node above 1 picks the ddp template
    assert "#SBATCH --partition=low" in out
    assert "train.py --devices 2 &" in out
    assert not (tmp_path / "r").exists(), "a dry run must not create anything"


def test_cli_rejects_options_the_template_ignores(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["sbatch", "--dry-run", "--template", "single", "--nodes", "2", "--", "python", "x.py"])
    assert rc == 2
    assert "--nodes" in capsys.readouterr().err


def test_cli_reports_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["sbatch", "--dry-run", "--job-name", "a;b", "--", "python", "x.py"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--job-name" in err and "';'" in err


def test_cli_unknown_template(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["sbatch", "--dry-run", "--template", "nope", "--", "true"]) == 2
    assert "single" in capsys.readouterr().err


def test_custom_template_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "mine.sbatch"
    template.write_text("#!/bin/bash\n#SBATCH --job-name={{job_name}}\n{{?partition}}#SBATCH -p {{partition}}\n"
                        "srun {{command}}\n")
    assert cli_main(["sbatch", "--dry-run", "--template", str(template), "--", "echo", "hi there"]) == 0
    assert capsys.readouterr().out == "#!/bin/bash\n#SBATCH --job-name=preemptible\nsrun echo 'hi there'\n"


def test_register_adds_the_subcommand() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["sbatch", "--nodes", "2", "--", "python", "train.py", "--nodes", "3"])
    assert args.nodes == 2 and args.command[-2:] == ["--nodes", "3"]
    assert callable(args.func)


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["sbatch", "--help"])
    assert "examples:" in capsys.readouterr().out


# --- submission with a stand-in sbatch ------------------------------------------------------------
def fake_sbatch(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "sbatch"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)


def test_submit_passes_the_script_on_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sbatch(tmp_path / "bin", f'cat > {tmp_path}/got; echo "$@" > {tmp_path}/args; echo "4242;cluster"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert submit("#!/bin/bash\necho hi\n") == "4242"
    assert (tmp_path / "got").read_text() == "#!/bin/bash\necho hi\n"
    assert (tmp_path / "args").read_text().split() == ["--parsable"]


def test_submit_failure_carries_sbatch_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sbatch(tmp_path / "bin", "echo 'sbatch: error: invalid partition specified: gpu' >&2; exit 1\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SubmitError, match="invalid partition specified: gpu"):
        submit("#!/bin/bash\n")


def test_submit_without_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SubmitError, match="not on PATH"):
        submit("#!/bin/bash\n")


def test_cli_submits_and_prints_the_job_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fake_sbatch(tmp_path / "bin", f"cat > {tmp_path}/got; echo 77\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["sbatch", "--job-name", "exp", "--", "python", "t.py"]) == 0
    assert capsys.readouterr().out.strip() == "77"
    # The default run directory exists before sbatch runs: SLURM does not create --output's directory.
    assert (tmp_path / "runs" / "exp").is_dir()
    assert f"--output={tmp_path}/runs/exp/slurm-%j.out" in (tmp_path / "got").read_text()


def test_the_templates_are_package_data_where_they_are_looked_up() -> None:
    """An installed copy finds its templates: pyproject's package-data covers the files ``find_template`` reads."""
    import tomllib

    import preemptible

    root = Path(__file__).resolve().parents[1]
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {(Path(preemptible.__file__).parent.joinpath(*package.split(".")[1:]) / pattern)
               for package, patterns in package_data.items() for pattern in patterns}
    shipped_files = {p.resolve() for pattern in shipped for p in pattern.parent.glob(pattern.name)}
    for name in ("single", "ddp"):
        assert find_template(name).resolve() in shipped_files, f"{name}.sbatch is not in the wheel's package-data"
