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
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # Reported by the command's own parser, so the message names the command and shows its usage
        # (the top-level parser would say "preemptible: error: ..." whatever the command).
        command = _command_parsers(parser).get(getattr(args, "subcommand", None) or "", parser)
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
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


def _command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its subparsers in the one _SubParsersAction (stdlib)
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


if __name__ == "__main__":
    sys.exit(main())
