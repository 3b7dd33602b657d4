"""Graceful stop on SIGINT/SIGTERM: the training loop checkpoints at a step boundary, then exits.

A Ctrl-C or a scheduler's SIGTERM (preemption) arriving in the middle of a compiled step, an
eval or a checkpoint write must not lose the run. The handler therefore does nothing but set a
flag; the loop looks at the flag after each step, writes a checkpoint there and returns
normally. A second signal means "now": it raises KeyboardInterrupt at once (an interrupted
checkpoint write leaves the previous file intact, see `atomic.py`).

Handlers can only be installed from the main thread; elsewhere `GracefulStop` installs nothing
and the loop simply never sees a request. The previous handlers are restored on exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager: while active, the first SIGINT/SIGTERM only sets `requested`."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, enabled: bool = True):
        self.signals = signals
        self.enabled = enabled
        self.signal_name: str | None = None  # e.g. "SIGINT", once one arrived
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived (checked by the loop at each step boundary)."""
        return self.signal_name is not None

    def request(self, name: str) -> None:
        """Ask for a stop as if a signal named `name` had arrived (tests, callbacks)."""
        if self.signal_name is None:
            self.signal_name = name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: printing or saving here could re-enter code the signal interrupted.
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting now")
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous.clear()


__all__ = ["STOP_SIGNALS", "GracefulStop"]
