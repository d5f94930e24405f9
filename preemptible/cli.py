"""The ``preemptible`` command: ``run``, ``demo``, ``sbatch``, ``check``, ``status``, ``report``.

Each subcommand lives in its own module and registers itself here through ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# (module, what it adds) — a module that fails to import takes only its own subcommand down.
_COMMANDS = (
    "preemptible.commands.run",
    "preemptible.commands.demo",
    "preemptible.commands.sbatch",
    "preemptible.commands.check",
    "preemptible.commands.status",
    "preemptible.commands.report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preemptible",
        description="Make PyTorch Lightning training survive cluster preemption.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'preemptible COMMAND --help' for a command's options and examples.",
    )
    # not dest="command": ``run`` and ``sbatch`` have a positional of that name, which would overwrite it
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"preemptible {args.subcommand}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
