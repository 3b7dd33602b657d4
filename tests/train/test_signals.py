"""GracefulStop: the first SIGINT/SIGTERM only sets a flag, a second aborts, handlers restored."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from alpha_jit.train.signals import GracefulStop


def _deliver(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(1000):  # Python runs the handler at the next bytecode boundary
        pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_sets_a_flag_second_aborts(sig):
    before = signal.getsignal(sig)
    with GracefulStop() as stop:
        assert not stop.requested
        _deliver(sig)
        assert stop.requested and stop.signal_name == sig.name
        with pytest.raises(KeyboardInterrupt, match=f"second {sig.name}"):
            _deliver(sig)
    assert signal.getsignal(sig) is before


def test_disabled_or_off_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop(enabled=False) as stop:
        assert signal.getsignal(signal.SIGINT) is before
        stop.request("SIGTERM")
        stop.request("SIGINT")  # the first reason is kept
        assert stop.signal_name == "SIGTERM"
    seen = []

    def worker():
        with GracefulStop() as s:
            seen.append(signal.getsignal(signal.SIGINT) is before and not s.requested)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [True]
