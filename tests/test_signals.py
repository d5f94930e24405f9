"""Signal handlers only record; they are restored; forked children ignore them."""

from __future__ import annotations

import os
import signal
import time

import pytest

from preemptible.core.signals import SignalRecorder, parse_signal


def test_parse_signal_names() -> None:
    assert parse_signal("USR1") is signal.SIGUSR1
    assert parse_signal("sigterm") is signal.SIGTERM
    assert parse_signal(12) is signal.SIGUSR2
    with pytest.raises(ValueError, match="unknown signal"):
        parse_signal("NOPE")


def test_records_first_signal_and_count_then_restores() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    rec = SignalRecorder(["USR1", "TERM"])
    rec.install()
    try:
        assert rec.note is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        note = rec.note
        assert note is not None and note.name == "SIGUSR1" and note.count == 3
        assert abs(note.first_at - time.time()) < 5
    finally:
        rec.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_sigkill_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot be caught"):
        SignalRecorder([signal.SIGKILL])


def test_forked_child_ignores_the_signal() -> None:
    rec = SignalRecorder(["USR1"])
    rec.install()
    try:
        pid = os.fork()
        if pid == 0:  # child: the inherited handler must neither record nor die
            os.kill(os.getpid(), signal.SIGUSR1)
            os._exit(0 if rec.note is None else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert rec.note is None, "the parent did not receive anything"
    finally:
        rec.restore()
