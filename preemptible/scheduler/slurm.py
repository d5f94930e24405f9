"""SLURM batch scripts: render a template, check every value, submit it (the library behind ``preemptible sbatch``).

Templates live in ``slurm_templates/`` (``single.sbatch``, ``ddp.sbatch``), reached from the
package as ``preemptible/scheduler/templates``. Their syntax is deliberately tiny:

* ``{{name}}`` is replaced by the value ``name`` (lowercase letters, digits, ``_``).
* A line that *starts* with ``{{?name}}`` is a conditional line: it is dropped when ``name`` is
  ``None`` or empty, otherwise kept without the marker. That is how optional ``#SBATCH`` lines
  (``--gpus-per-node`` on a CPU-only cluster, ``--partition``, ``--time``) disappear.

:func:`render_sbatch` is strict: a placeholder without a value, a value without a placeholder, a
malformed ``{{...}}`` or a value containing a newline raises :class:`ValueError` naming it.

Placeholders the shipped templates use: ``job_name``, ``nodes``, ``ntasks_per_node``,
``gpus_per_node``, ``cpus_per_task``, ``partition``, ``time``, ``signal_lead``, ``run_dir``,
``max_requeues``, ``command`` (already quoted with :func:`shlex.join`), ``requeue_exit_code`` and ``python``
(this interpreter, quoted: the batch shell runs :mod:`preemptible.scheduler.afterstep` with it after the step).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).parent / "templates"

_PLACEHOLDER = re.compile(r"\{\{(\?)?([a-z][a-z0-9_]*)\}\}")
_ANY_BRACES = re.compile(r"\{\{.*?\}\}|\{\{|\}\}")
# Job names and partitions end up unquoted in `#SBATCH` lines; allow what SLURM names use.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Paths: no whitespace (an `#SBATCH` line splits there), no shell metacharacters (the run dir is
# exported unquoted), no `%` (SLURM expands %j, %u... in --output).
_PATH_CHAR = re.compile(r"[\w./+@,:=-]")
_TIME_FORMATS = (
    re.compile(r"(?P<m>\d+)"),
    re.compile(r"(?P<m>\d+):(?P<s>\d{1,2})"),
    re.compile(r"(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2})"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d{1,2})"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d{1,2}):(?P<m>\d{1,2})"),
    re.compile(r"(?P<d>\d+)-(?P<h>\d{1,2}):(?P<m>\d{1,2}):(?P<s>\d{1,2})"),
)
#: SLURM keeps the --signal lead time in 16 bits.
MAX_SIGNAL_LEAD = 65535
DEFAULT_SIGNAL_LEAD = 120
DEFAULT_JOB_NAME = "preemptible"

#: CLI option for each value a user can set; a template that lacks the placeholder rejects it.
_OPTIONS = {
    "job_name": "--job-name",
    "nodes": "--nodes",
    "ntasks_per_node": "--ntasks-per-node",
    "gpus_per_node": "--gpus-per-node",
    "cpus_per_task": "--cpus-per-task",
    "partition": "--partition",
    "time": "--time",
    "signal_lead": "--signal-lead",
    "run_dir": "--run-dir",
    "max_requeues": "--max-requeues",
}


class SubmitError(RuntimeError):
    """``sbatch`` is missing or refused the script."""


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
def placeholders(template: str) -> set[str]:
    """The placeholder names ``template`` uses, conditional markers included.

    Raises:
        ValueError: a ``{{...}}`` that is not a valid placeholder, or a ``{{?name}}`` marker that
            does not start its line.
    """
    names: set[str] = set()
    for lineno, line in enumerate(template.splitlines(), 1):
        for match in _ANY_BRACES.finditer(line):
            found = _PLACEHOLDER.fullmatch(match.group())
            if found is None:
                raise ValueError(f"template line {lineno}: malformed placeholder {match.group()!r}; "
                                 "use {{name}} with lowercase letters, digits and '_'")
            if found.group(1) and match.start() != 0:
                raise ValueError(f"template line {lineno}: the conditional marker {match.group()} must start the line")
            names.add(found.group(2))
    return names


def render_sbatch(template: str, **values: Any) -> str:
    """Fill ``template``'s placeholders with ``values`` (see the module docstring for the syntax).

    Values are converted with :func:`str`; ``None`` is allowed only for names used in
    conditional markers, and drops those lines.

    Raises:
        ValueError: naming the placeholder that has no value, the value that has no placeholder,
            a malformed placeholder, or a value with a newline.
    """
    names = placeholders(template)
    missing = sorted(names - values.keys())
    if missing:
        raise ValueError(f"the template needs a value for {{{{{missing[0]}}}}} (missing: {', '.join(missing)})")
    unknown = sorted(values.keys() - names)
    if unknown:
        raise ValueError(f"the template has no placeholder {{{{{unknown[0]}}}}} (unused values: {', '.join(unknown)})")
    text = {name: None if value is None else str(value) for name, value in values.items()}
    for name, value in text.items():
        if value is not None and ("\n" in value or "\r" in value):
            raise ValueError(f"the value for {{{{{name}}}}} contains a newline, which would end the script line")

    def substitute(match: re.Match[str]) -> str:
        name = match.group(2)
        if text[name] is None:
            raise ValueError(f"{{{{{name}}}}} is None but is used outside a {{{{?{name}}}}} conditional line")
        return text[name]  # type: ignore[return-value]

    out = []
    for line in template.splitlines(keepends=True):
        marker = _PLACEHOLDER.match(line)
        if marker and marker.group(1):
            if text[marker.group(2)] in (None, ""):
                continue
            line = line[marker.end():]
        out.append(_PLACEHOLDER.sub(substitute, line))
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Validation of user values
# ---------------------------------------------------------------------------------------------
def _describe(char: str) -> str:
    return {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", " ": "a space"}.get(char, repr(char))


def check_name(option: str, value: str) -> str:
    """A job name or partition: letters, digits, ``.``, ``_``, ``-``; nothing a shell would act on."""
    if _NAME.fullmatch(value):
        return value
    if not value:
        raise ValueError(f"{option} is empty; give a name of letters, digits, '.', '_' or '-'")
    bad = next((c for c in value if not re.fullmatch(r"[A-Za-z0-9._-]", c)), value[0])
    raise ValueError(f"{option} {value!r} contains {_describe(bad)}; use only letters, digits, '.', '_' "
                     "and '-' (and start with a letter or digit)")


def check_path(option: str, value: str | os.PathLike[str]) -> str:
    """An absolute form of ``value`` that is safe unquoted in ``#SBATCH`` lines and ``export``."""
    raw = os.fspath(value)
    if not raw:
        raise ValueError(f"{option} is empty; give a directory")
    path = os.path.abspath(os.path.expanduser(raw))
    for char in path:
        if char == "%":
            raise ValueError(f"{option} {raw!r} contains '%', which SLURM expands in file names (%j, %u...); "
                             "choose a directory without '%'")
        if not _PATH_CHAR.fullmatch(char):
            raise ValueError(f"{option} {raw!r} contains {_describe(char)}, which is not safe in a batch script; "
                             "choose a path of letters, digits and . _ - + @ , : = /")
    return path


def check_count(option: str, value: int, minimum: int = 1) -> int:
    """An integer of at least ``minimum`` (1: a positive count; 0 where zero means "none")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{option} must be an integer, got {value!r}")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{option} must be {what}, got {value}")
    return value


def parse_time(value: str) -> int | None:
    """Seconds in a SLURM ``--time`` value, ``None`` for UNLIMITED/INFINITE.

    Accepted: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``, ``UNLIMITED``, ``INFINITE``.
    """
    if value.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    for pattern in _TIME_FORMATS:
        match = pattern.fullmatch(value)
        if match:
            parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            seconds = ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
            if seconds == 0:
                raise ValueError(f"--time {value!r} is zero; give a positive limit or UNLIMITED")
            return seconds
    raise ValueError(f"--time {value!r} is not a SLURM time: use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                     "D-HH:MM:SS or UNLIMITED")


def build_values(
    command: Sequence[str],
    *,
    run_dir: str | os.PathLike[str],
    job_name: str = DEFAULT_JOB_NAME,
    nodes: int = 1,
    ntasks_per_node: int = 1,
    gpus_per_node: int = 0,
    cpus_per_task: int = 1,
    partition: str | None = None,
    time: str | None = None,
    signal_lead: int = DEFAULT_SIGNAL_LEAD,
    max_requeues: int | None = None,
) -> dict[str, Any]:
    """Check every value and return all placeholders' values, ready for :func:`render_sbatch`.

    ``gpus_per_node=0`` and ``partition``/``time``/``max_requeues`` of ``None`` become ``None``,
    which drops their conditional lines (the cluster's default partition and time limit, the
    callback's default requeue limit).
    """
    from preemptible.core.exit import REQUEUE_EXIT_CODE

    if not command:
        raise ValueError("no command to run: put it after '--', e.g. preemptible sbatch -- python train.py")
    for arg in command:
        if "\n" in arg or "\r" in arg or "\0" in arg:
            raise ValueError(f"command argument {arg!r} contains a newline or NUL; pass such text through a file")
    lead = check_count("--signal-lead", signal_lead)
    if lead > MAX_SIGNAL_LEAD:
        raise ValueError(f"--signal-lead {lead} is above SLURM's maximum of {MAX_SIGNAL_LEAD} seconds")
    if time is not None:
        limit = parse_time(time)
        if limit is not None and lead >= limit:
            raise ValueError(f"--signal-lead {lead} s is not shorter than --time {time} ({limit} s): the warning "
                             "would come at once; lower --signal-lead or raise --time")
    return {
        "job_name": check_name("--job-name", job_name),
        "nodes": check_count("--nodes", nodes),
        "ntasks_per_node": check_count("--ntasks-per-node", ntasks_per_node),
        "gpus_per_node": check_count("--gpus-per-node", gpus_per_node, minimum=0) or None,
        "cpus_per_task": check_count("--cpus-per-task", cpus_per_task),
        "partition": None if partition is None else check_name("--partition", partition),
        "time": time,
        "signal_lead": lead,
        "run_dir": check_path("--run-dir", run_dir),
        "max_requeues": None if max_requeues is None else check_count("--max-requeues", max_requeues, minimum=0),
        "command": shlex.join(command),
        "requeue_exit_code": REQUEUE_EXIT_CODE,
        "python": shlex.quote(sys.executable),
    }


# ---------------------------------------------------------------------------------------------
# Templates and submission
# ---------------------------------------------------------------------------------------------
def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.sbatch"))


def find_template(name_or_path: str) -> Path:
    """A shipped template by name (``single``, ``ddp``) or a template file by path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if "/" not in name_or_path and not name_or_path.endswith(".sbatch"):
        shipped = TEMPLATE_DIR / f"{name_or_path}.sbatch"
        if shipped.is_file():
            return shipped
    raise FileNotFoundError(f"no template {name_or_path!r}: give one of {', '.join(available_templates())} "
                            "or the path of a .sbatch file")


def submit(script_text: str, sbatch: str = "sbatch", timeout: float = 60.0) -> str:
    """Submit ``script_text`` with ``sbatch --parsable`` (script on stdin) and return the job id.

    Raises:
        SubmitError: sbatch is not on PATH, fails, times out or prints no job id; the message
            carries sbatch's own error output.
    """
    exe = shutil.which(sbatch)
    if exe is None:
        raise SubmitError(f"'{sbatch}' is not on PATH: run this on a SLURM login node, or start the local test "
                          "cluster (bash docker/slurm/cluster.sh start) and export the SLURM_CONF it prints")
    try:
        done = subprocess.run([exe, "--parsable"], input=script_text, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise SubmitError(f"sbatch did not answer within {timeout:.0f} s; is slurmctld up? (scontrol ping)") from None
    if done.returncode != 0:
        detail = done.stderr.strip() or done.stdout.strip() or "no output"
        raise SubmitError(f"sbatch failed (exit {done.returncode}): {detail}")
    # --parsable prints "JOBID" or "JOBID;CLUSTER".
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed no job id: {done.stdout.strip()!r} {done.stderr.strip()}")
    return job_id
