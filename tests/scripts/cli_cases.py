"""Testing: several LightningCLI invocations in one process (one Lightning import), each reported as one JSON line.

``python tests/scripts/cli_cases.py NAMESPACE MAIN_PY CASES_JSON`` runs the ``LightningCLI`` call of the
README's ``main.py`` (``MAIN_PY``, already written for ``NAMESPACE``) once per case, with the case's
arguments, and prints ``{"case": name, "exit": code or exception type, "output": stdout+stderr, "error": str}``.
Used by tests/test_lightning_doors.py for the bad-input and ``--help`` cases, which end before training.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from typing import Any


def run_case(main_py: str, argv: list[str]) -> dict[str, Any]:
    out = io.StringIO()
    result: dict[str, Any] = {"exit": 0, "error": ""}
    saved_argv, sys.argv = sys.argv, [main_py, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(main_py, run_name="__main__")
        except SystemExit as exc:
            result["exit"] = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - reported to the test, which checks the message
            result["exit"] = type(exc).__name__
            result["error"] = str(exc)
        finally:
            sys.argv = saved_argv
    result["output"] = out.getvalue()
    return result


def main() -> int:
    namespace, main_py, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    __import__({"lightning": "lightning.pytorch", "pytorch_lightning": "pytorch_lightning"}[namespace])
    for name, argv in cases.items():
        print(json.dumps({"case": name, **run_case(main_py, argv)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
