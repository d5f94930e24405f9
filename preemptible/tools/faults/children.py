"""The child processes of the fault campaigns: ``python -m preemptible.tools.faults.children NAME ...``.

* ``writer DIR --size N --log FILE``: commits checkpoints in a loop through ``CheckpointStore`` (to be SIGKILLed);
* ``limited-writer DIR --size N --step S``: commits one checkpoint, exit 3 with the error if the store refuses;
* ``train ...``: the example training with a bigger checkpoint and self-signals at awkward points.

The commands are built by :func:`~preemptible.tools.faults.harness.child_command` and
:func:`~preemptible.tools.faults.harness.train_command`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from typing import Any, Optional, Sequence

from preemptible.core.store import CheckpointError, CheckpointStore
from preemptible.tools.faults.harness import CHILDREN, HOLD_DIR_ENV, MiB
from preemptible.tools.faults.oracle import commit_payload

SELF_SIGNAL_POINTS = ("sanity", "save", "train_end", "fit_end", "teardown", "after_fit")
#: Where ``--hold`` can pause an attempt (see :func:`train_main`).
HOLD_POINTS = ("train-start", "step:N", "mid-write", "after-commit")
#: Seconds a hold waits at most; then the attempt goes on (and the test's own checks fail).
HOLD_TIMEOUT = 120.0


def hold_marker(hold_dir: str | os.PathLike[str], attempt: int, name: str) -> str:
    """The file a hold creates when it is reached (``name``: a point) or that releases it (``"release"``)."""
    return os.path.join(os.fspath(hold_dir), f"attempt-{attempt}.{name.replace(':', '-')}")




def writer_main(argv: Sequence[str]) -> int:
    """Commit checkpoints of consecutive steps in a loop, logging ``<pid> begin|commit|pruned <step>`` lines."""
    p = argparse.ArgumentParser(prog=f"python -m {CHILDREN} writer")
    p.add_argument("directory")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--pause", type=float, default=0.1, help="up to this many seconds of 'training' between saves")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    store = CheckpointStore(a.directory, keep=2)
    rng = random.Random(a.seed)
    fd = os.open(a.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def log(event: str, step: int) -> None:
        os.write(fd, f"{os.getpid()} {event} {step}\n".encode())

    # What every start does: clear dead writers' temp files, resume from the newest valid checkpoint.
    store.clean_stale_temps()
    latest = store.latest_valid()
    step = (latest.step if latest else 0) + 1
    print("ready", flush=True)
    while True:
        log("begin", step)
        stored = commit_payload(store, step, a.size)
        log("commit", step)
        store.prune(protect={stored.path})
        log("pruned", step)
        time.sleep(rng.uniform(0, a.pause))
        step += 1


def limited_writer_main(argv: Sequence[str]) -> int:
    """Write one checkpoint of ``--size`` bytes; exit 3 with the error on stdout if the store refuses."""
    p = argparse.ArgumentParser(prog=f"python -m {CHILDREN} limited-writer")
    p.add_argument("directory")
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--step", type=int, required=True)
    a = p.parse_args(argv)
    store = CheckpointStore(a.directory, keep=2)
    try:
        commit_payload(store, a.step, a.size)
    except CheckpointError as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
        return 3
    return 0


def train_main(argv: Sequence[str]) -> int:
    """``preemptible.examples.train`` plus fault hooks; options not listed here go to the example.

    ``--ballast-mb N`` adds an N MiB tensor to the checkpoint (in a callback's state, so the model, its
    losses and its weight digest stay those of the plain example). ``--self-signal POINT:SIG`` makes the
    process signal itself at POINT: ``sanity`` (first sanity-check batch), ``save`` (while the
    checkpoint is being assembled), ``train_end``, ``fit_end`` (after Lightning restored the signal
    handlers, before preemptible's own on_fit_end), ``teardown`` (after preemptible's teardown),
    ``after_fit`` (after ``trainer.fit`` returned).

    ``--hold POINTS`` (one per attempt, picked by ``PREEMPTIBLE_ATTEMPT``; ``-`` for none; several points
    separated by commas) pauses the attempt at a state, so that a fault lands there whatever the machine's
    speed; a hold only sleeps (nothing is trained, no random number is drawn) and gives up after
    :data:`HOLD_TIMEOUT` seconds:

    * ``train-start``: before the first step (ahead of preemptible's own ``on_train_start``), until a
      preemption signal has been recorded: a signal sent during the resumed run's set-up lands before its
      first step;
    * ``step:N``: after the attempt's N-th step (its boundary and progress file done, every callback's hooks
      of that batch run), until a preemption signal has been recorded: a signal sent once the hold is reached
      stops the run at the next boundary, exactly (:meth:`~preemptible.tools.faults.harness.Control.wait_step`
      waits for the hold when the attempt has one at that step);
    * ``mid-write``: in the attempt's first checkpoint write, once 1 MiB or more is in the temp file: creates
      the marker :func:`hold_marker` ``(hold_dir, attempt, "mid-write")``, waits until the ``"release"``
      marker exists (a SIGKILL meanwhile lands mid-write, certainly); the holds for a signal create their
      marker too when reached;
    * ``after-commit``: right after the attempt's first commit record is written: the same with the
      ``"after-commit"`` marker (the process is still on its way out).

    ``--hold-dir`` holds the markers (default ``$PREEMPTIBLE_FAULTS_HOLD_DIR``, set by
    :func:`~preemptible.tools.faults.harness.run_attempt`).
    """
    p = argparse.ArgumentParser(prog=f"python -m {CHILDREN} train", add_help=False)
    p.add_argument("--ballast-mb", type=float, default=0.0)
    p.add_argument("--self-signal", action="append", default=[], metavar="POINT:SIG")
    p.add_argument("--hold", action="append", default=[], metavar="POINTS")
    p.add_argument("--hold-dir", default=None)
    ours, rest = p.parse_known_args(argv)
    from preemptible.core.environment import JobEnvironment

    attempt = JobEnvironment.from_env().restart_count
    holds = set(filter(None, ours.hold[attempt].split(","))) - {"-"} if attempt < len(ours.hold) else set()
    for point in holds:
        if point not in HOLD_POINTS and not (point.startswith("step:") and point[5:].isdigit()):
            raise SystemExit(f"unknown hold point {point!r}; one of {HOLD_POINTS}")
    hold_dir = ours.hold_dir or os.environ.get(HOLD_DIR_ENV, "holds")
    if holds:
        os.makedirs(hold_dir, exist_ok=True)
    points: dict[str, signal.Signals] = {}
    for spec in ours.self_signal:
        point, _, name = spec.partition(":")
        if point not in SELF_SIGNAL_POINTS:
            raise SystemExit(f"unknown self-signal point {point!r}; one of {SELF_SIGNAL_POINTS}")
        points[point] = signal.Signals["SIG" + (name or "TERM").upper().removeprefix("SIG")]
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    import pytorch_lightning as pl
    import torch

    from preemptible.examples import train as train_example
    from preemptible.tools.tracing import hold_until, preemption_signal_recorded

    def wait(what: str, done: Any) -> None:
        if not hold_until(done, HOLD_TIMEOUT):
            print(f"faults: hold gave up waiting for {what} after {HOLD_TIMEOUT:.0f} s", flush=True)

    def arrived(point: str, until: str) -> None:
        holds.discard(point)
        print(f"faults: holding at {point} until {until}", flush=True)
        with open(hold_marker(hold_dir, attempt, point), "w"):
            pass

    def hold_for_signal(point: str) -> None:
        if point in holds:
            arrived(point, "a preemption signal is recorded")
            wait("a preemption signal", preemption_signal_recorded)

    def hold_for_release(point: str) -> None:
        if point in holds:
            arrived(point, "released")
            release = hold_marker(hold_dir, attempt, "release")
            wait(release, lambda: os.path.exists(release))

    if "mid-write" in holds or "after-commit" in holds:
        from preemptible.core import store as store_module
        from preemptible.core.checksums import HashingFile

        class HeldHashingFile(HashingFile):
            def write(self, data: Any) -> int:
                n = super().write(data)
                if self.bytes >= MiB:
                    hold_for_release("mid-write")
                return n

        commit = store_module.CheckpointStore.commit

        def held_commit(self: Any, *args: Any, **kwargs: Any) -> Any:
            stored = commit(self, *args, **kwargs)
            hold_for_release("after-commit")
            return stored

        setattr(store_module, "HashingFile", HeldHashingFile)  # noqa: B010 - the store looks it up at call time
        setattr(store_module.CheckpointStore, "commit", held_commit)  # noqa: B010

    def fire(point: str) -> None:
        sig = points.pop(point, None)  # each point fires once per process
        if sig is not None:
            print(f"faults: self-signal {sig.name} at {point}", flush=True)
            os.kill(os.getpid(), sig)

    class Ballast(pl.Callback):
        def __init__(self, mib: float) -> None:
            self.tensor = torch.arange(int(mib * MiB) // 4, dtype=torch.float32)

        def state_dict(self) -> dict[str, Any]:
            fire("save")
            return {"ballast": self.tensor}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            if not torch.equal(state_dict["ballast"], self.tensor):
                raise RuntimeError("faults: the ballast tensor read back from the checkpoint differs")

    class Before(pl.Callback):  # placed before PreemptionCallback
        def on_validation_batch_start(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if trainer.sanity_checking:
                fire("sanity")

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            hold_for_signal("train-start")

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            fire("train_end")

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            fire("fit_end")

    class After(pl.Callback):  # placed after PreemptionCallback
        def __init__(self) -> None:
            self.start: Optional[int] = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = trainer.global_step

        def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
            if self.start is not None:
                hold_for_signal(f"step:{trainer.global_step - self.start}")

        def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
            fire("teardown")

    class Trainer(pl.Trainer):
        def __init__(self, *args: Any, callbacks: Optional[list[Any]] = None, **kwargs: Any) -> None:
            extra: list[Any] = [Ballast(ours.ballast_mb)] if ours.ballast_mb else []
            super().__init__(*args, callbacks=[Before(), *(callbacks or []), *extra, After()], **kwargs)

    setattr(pl, "Trainer", Trainer)  # noqa: B010 - train_example looks it up at call time
    code = train_example.main(rest)
    fire("after_fit")
    return code


ENTRY_POINTS = {"writer": writer_main, "limited-writer": limited_writer_main, "train": train_main}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ENTRY_POINTS:
        print(f"usage: python -m {CHILDREN} {{{','.join(ENTRY_POINTS)}}} ...", file=sys.stderr)
        return 2
    return ENTRY_POINTS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
