"""``preemptible sbatch``: render a requeue-ready batch script (:mod:`preemptible.scheduler.slurm`) and submit it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from preemptible.scheduler.slurm import (
    _OPTIONS,
    DEFAULT_JOB_NAME,
    DEFAULT_SIGNAL_LEAD,
    available_templates,
    build_values,
    find_template,
    placeholders,
    render_sbatch,
    submit,
)

_EXAMPLES = """\
examples:
  # one task, warned 5 minutes before a 4-hour limit
  preemptible sbatch --time 4:00:00 --signal-lead 300 --run-dir runs/exp1 -- python train.py --lr 0.1

  # 2 nodes x 4 GPUs, one task per GPU (the trainer needs devices=4, num_nodes=2)
  preemptible sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 --cpus-per-task 8 \\
      --partition gpu --run-dir /scratch/me/exp2 -- python train.py

  # look at the script without submitting it
  preemptible sbatch --dry-run --ntasks-per-node 2 --run-dir runs/x -- python train.py

The job log is RUN_DIR/slurm-<jobid>.out, appended to by every attempt. Submitting again with
the same --run-dir resumes from its newest checkpoint.

templates: --template single (one task) or ddp (nodes x ntasks-per-node tasks); the default
picks ddp when --nodes or --ntasks-per-node is above 1. A template file of your own may use
{{name}} placeholders and lines starting with {{?name}} that are dropped when name is unset.
"""


def register(subparsers: Any) -> None:
    """Add the ``sbatch`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "sbatch",
        help="render a requeue-ready SLURM batch script and submit it",
        description="Render a SLURM batch script that survives preemption (requeue, a USR1 warning to\n"
                    "every task, one appended log), check every value, submit it with sbatch and print\n"
                    "the job id.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Defaults are None so that run_sbatch can tell an option the user gave from one left alone.
    p.add_argument("--template", default=None, metavar="NAME|PATH",
                   help=f"template name ({', '.join(available_templates()) or 'single, ddp'}) or file")
    p.add_argument("--nodes", type=int, default=None, metavar="N", help="nodes (ddp; default 1)")
    p.add_argument("--ntasks-per-node", type=int, default=None, metavar="G",
                   help="tasks per node, one per GPU (ddp; default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="G", help="GPUs per node (default 0: none)")
    p.add_argument("--cpus-per-task", type=int, default=None, metavar="C", help="CPUs per task (default 1)")
    p.add_argument("--partition", default=None, metavar="P", help="partition (default: the cluster's default)")
    p.add_argument("--time", default=None, metavar="T",
                   help="time limit: minutes, HH:MM:SS, D-HH:MM:SS... (default: the partition's)")
    p.add_argument("--signal-lead", type=int, default=None, metavar="S",
                   help=f"send SIGUSR1 to every task S seconds before the time limit (default {DEFAULT_SIGNAL_LEAD})")
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help="checkpoints and job log (default: runs/JOB_NAME in the current directory)")
    p.add_argument("--job-name", default=None, metavar="NAME", help=f"job name (default {DEFAULT_JOB_NAME})")
    p.add_argument("--max-requeues", type=int, default=None, metavar="K",
                   help="stop requeueing after K requeues (default: the PreemptionCallback's)")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS...",
                   help="the training command, run by srun on every task")
    p.set_defaults(func=run_sbatch)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _OPTIONS if getattr(args, name, None) is not None}


def run_sbatch(args: argparse.Namespace) -> int:
    """Render, check and submit (or print, with ``--dry-run``); prints the job id. Returns 0.

    Raises:
        ValueError: an invalid value, or an option the chosen template has no placeholder for.
        FileNotFoundError: unknown template.
        SubmitError: sbatch failed.
    """
    command = list(args.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    given = _given(args)
    template_name = args.template or ("ddp" if given.get("nodes", 1) > 1 or given.get("ntasks_per_node", 1) > 1
                                      else "single")
    path = find_template(template_name)
    template = path.read_text()
    used = placeholders(template)
    for name in given:
        if name not in used:
            raise ValueError(f"{_OPTIONS[name]} has no effect with template {path.name} (no {{{{{name}}}}} "
                             "placeholder); choose a template that uses it, e.g. --template ddp")
    job_name = given.get("job_name", DEFAULT_JOB_NAME)
    options = dict(given)
    options["job_name"] = job_name
    options.setdefault("run_dir", Path("runs") / job_name)
    values = build_values(command, **options)
    script = render_sbatch(template, **{name: value for name, value in values.items() if name in used})
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    run_dir = Path(values["run_dir"])
    # SLURM does not create the directory of --output: without it the job fails with no log at all.
    run_dir.mkdir(parents=True, exist_ok=True)
    job_id = submit(script)
    print(job_id)
    print(f"preemptible: submitted job {job_id}; log {run_dir}/slurm-{job_id}.out", file=sys.stderr)
    return 0
