"""Testing: for each run_dir on the command line, start a session there and print what it said, one line each.

``python tests/scripts/bad_run_dirs.py DIR...`` prints ``DIR<TAB>ok`` or ``DIR<TAB>ErrorType: message``.
Run as the user and in the mount namespace under test (tests/test_lightning_doors.py).
"""

from __future__ import annotations

import sys

from preemptible import PreemptionSession


def main(paths: list[str]) -> int:
    for path in paths:
        try:
            session = PreemptionSession(run_dir=path, requeue="none", deadline=False)
            session.resume_path()
            session.open(rank=0, world_size=1)
            session.end()
            print(f"{path}\tok", flush=True)
        except Exception as exc:  # noqa: BLE001 - the point is to print what each one raised
            print(f"{path}\t{type(exc).__name__}: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
