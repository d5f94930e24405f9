"""Shared test helpers: build example-training commands and compare their loss records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from preemptible.core.schema import REDONE_KINDS, Event, read_trace, trace_key
from preemptible.examples.train import options_to_argv

PYTHON = sys.executable


def example_command(record: Path, max_steps: int = 24, devices: int = 1, **options: Any) -> list[str]:
    return [PYTHON, "-m", "preemptible.examples.train", "--max-steps", str(max_steps), "--devices", str(devices),
            "--record", str(record), *options_to_argv(**options)]


def load_record(path: Path) -> tuple[dict[tuple[Any, ...], str], list[tuple[Any, ...]], dict[int, str]]:
    """(loss by (kind, rank, epoch, batch, step), duplicated keys, final weight digest by rank)."""
    path = Path(path)
    assert path.exists(), f"no step record at {path}"
    trace = read_trace(path)
    return ({key: entry.get("loss", entry.get("metrics")) for key, entry in trace.entries.items()}, trace.duplicates,
            trace.final)


def assert_same_as_reference(record: Path, reference: Path) -> int:
    """Every training/validation loss and the final weights are bitwise equal; nothing replayed or skipped.

    Returns the number of compared losses.
    """
    got, dup, got_final = load_record(record)
    want, _, want_final = load_record(reference)
    assert not dup, f"batches trained twice (replayed after resume): {dup[:5]}"
    assert_redone_validations_agree(record)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing, f"batches never trained (skipped after resume): {missing[:5]}"
    assert not extra, f"batches the reference never trained: {extra[:5]}"
    differ = [k for k in sorted(want) if got[k] != want[k]]
    assert not differ, (f"{len(differ)} losses differ from the uninterrupted run, first at {differ[0]}: "
                        f"{got[differ[0]]} vs {want[differ[0]]}")
    assert got_final and got_final == want_final, f"final weights differ: {got_final} vs {want_final}"
    return len(want)


def assert_same_after_crash(record: Path, reference: Path, resumed_at: dict[int, int]) -> int:
    """A run that crashed and resumed from a periodic checkpoint: every loss (also those of the steps the
    crashed attempt trained past its checkpoint, which are trained again) and the final weights are
    bitwise those of the uninterrupted run; nothing skipped; attempt ``a`` trained nothing at or before
    the step ``resumed_at[a]`` it resumed from, and started right after it.

    Returns the number of compared losses.
    """
    trace, want = read_trace(record), read_trace(reference)
    want_loss = {key: entry.get("loss", entry.get("metrics")) for key, entry in want.entries.items()}
    for entry in trace.lines:
        key = trace_key(entry)
        assert key in want_loss, f"a batch the reference never trained: {key}"
        got = entry.get("loss", entry.get("metrics"))
        assert got == want_loss[key], (f"attempt {entry['attempt']}: the loss at {key} differs from the "
                                       f"uninterrupted run: {got} vs {want_loss[key]}")
    missing = sorted(set(want_loss) - {trace_key(e) for e in trace.lines})
    assert not missing, f"batches never trained (skipped after resume): {missing[:5]}"
    for attempt, step in resumed_at.items():
        steps = [e["step"] for e in trace.lines if e["attempt"] == attempt and e["kind"] == "train"]
        assert steps and min(steps) == step + 1, f"attempt {attempt} trained steps {steps[:3]}..., not from {step + 1}"
    assert trace.final and trace.final == want.final, f"final weights differ: {trace.final} vs {want.final}"
    return len(want_loss)


def assert_redone_validations_agree(record: Path) -> list[tuple[Any, ...]]:
    """A validation interrupted and redone after the resume computed, for every batch the interrupted one
    reached, bitwise the same loss (same weights, same random stream). Returns the redone keys."""
    trace = read_trace(record)
    seen: dict[tuple[Any, ...], set[Any]] = {}
    for entry in trace.lines:
        if entry["kind"] in REDONE_KINDS:
            seen.setdefault(trace_key(entry), set()).add(json.dumps([entry.get("loss"), entry.get("metrics")]))
    differ = [key for key in trace.redone if len(seen.get(key, ())) > 1]
    assert not differ, f"a redone validation differs from the interrupted one at {differ[:3]}"
    return trace.redone


def stops(events: list[dict[str, Any]], attempt: int) -> list[tuple[Any, ...]]:
    """(place, step, batch) of each stop_agreed of rank 0 in ``attempt``."""
    return [(e.get("place"), e["step"], e.get("batch")) for e in events
            if e["event"] == Event.STOP_AGREED and e["restart_count"] == attempt and e.get("rank", 0) == 0]


# ---------------------------------------------------------------------------------------------------
# Uninterrupted reference runs, forked from a process that has imported Lightning once
# ---------------------------------------------------------------------------------------------------
class ReferenceForkServer:
    """Runs the example training, uninterrupted, in processes forked from one that imported torch and
    Lightning once (a launch otherwise pays ~5 s of imports, twice under DDP).

    Only the reference runs go through it: every preempted run is a fresh ``python -m
    preemptible.examples.train`` under the real supervisor. A run of N ranks is N forked processes
    launched as an outside launcher does it (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``: Lightning
    then starts no process itself); it is a real N-process gloo DDP run. The server forks before it
    computes anything, so no thread pool is forked.
    """

    def __init__(self, log: Path) -> None:
        import subprocess

        code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import helpers; helpers._serve_references()"
        with open(log, "ab") as err:
            self._proc = subprocess.Popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=err, text=True, bufsize=1)
        self.log = log
        self._ready = False

    def run(self, argv: list[str], devices: int, env: dict[str, str], log: Path, timeout: float) -> list[int]:
        """Exit codes of the ranks of ``python -m preemptible.examples.train ARGV`` with ``env`` added."""
        import json

        assert self._proc.stdin is not None and self._proc.stdout is not None
        if not self._ready:
            line = self._proc.stdout.readline()
            assert line.strip() == "ready", f"the reference fork server did not start: {self.log.read_text()[-3000:]}"
            self._ready = True
        request = {"argv": argv, "devices": devices, "env": env, "log": str(log), "timeout": timeout}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        assert line, f"the reference fork server died: {self.log.read_text()[-3000:]}"
        return json.loads(line)["codes"]

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except Exception:
            self._proc.kill()


def _serve_references() -> None:
    """The fork server's loop: one JSON request per line on stdin, one JSON answer per line on stdout."""
    import json
    import os
    import signal
    import socket
    import time

    os.environ.setdefault("PL_DISABLE_FORK", "1")
    import pytorch_lightning  # noqa: F401
    import torch  # noqa: F401

    import preemptible.examples.models  # noqa: F401
    import preemptible.lightning  # noqa: F401
    import preemptible.tools.tracing  # noqa: F401
    from preemptible.examples import train

    try:
        import torchdata.stateful_dataloader  # noqa: F401
    except ImportError:
        pass
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not reach the answers
    print("ready", file=answers)
    for line in sys.stdin:
        request = json.loads(line)
        devices = request["devices"]
        port = 0
        if devices > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        sys.stdout.flush()
        sys.stderr.flush()
        pids = []
        for rank in range(devices):
            pid = os.fork()
            if pid == 0:  # the rank: its own session, output to the log, the example's main
                code = 1
                try:
                    os.setsid()
                    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.environ.update(request["env"])
                    if devices > 1:
                        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0",
                                          LOCAL_RANK=str(rank), WORLD_SIZE=str(devices))
                    sys.argv = [train.__file__, *request["argv"]]
                    code = train.main(request["argv"])
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        codes: dict[int, int] = {}
        deadline = time.monotonic() + request["timeout"]
        while len(codes) < len(pids):
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                for pid in pids:
                    if pid not in codes:
                        try:
                            os.killpg(pid, signal.SIGKILL)
                        except OSError:
                            pass
                        codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            time.sleep(0.02)
        print(json.dumps({"codes": [codes[p] for p in pids]}), file=answers)


def readme_blocks(heading: str) -> list[tuple[str, str]]:
    """The fenced code blocks (language, text) of README.md's section ``heading`` (up to the next heading).

    Tests run the README's examples from here, so the README cannot drift from what is tested.
    """
    lines = (Path(__file__).resolve().parent.parent / "README.md").read_text().splitlines(keepends=True)
    blocks: list[tuple[str, str]] = []
    inside, fence, found = False, None, False
    for line in lines:
        if fence is not None:
            if line.startswith("```"):
                blocks.append(fence)
                fence = None
            else:
                fence = (fence[0], fence[1] + line)
        elif line.startswith("```"):
            if inside:
                fence = (line[3:].strip(), "")
        elif line.startswith("#"):
            if inside:
                break
            inside = found = line.lstrip("#").strip() == heading
    assert found, f"README.md has no section {heading!r}"
    return blocks


def finish_ranks(procs: list[subprocess.Popen[str]], timeout: float) -> tuple[list[int], list[str]]:
    """Every rank's exit code and output; a rank still running after ``timeout`` is killed (all are) and fails the test."""
    import pytest

    codes, outputs = [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a rank was still running after {timeout:.0f} s")
        codes.append(proc.returncode)
        outputs.append(out)
    return codes, outputs
