"""Training metrics: a buffered JSONL log and a tokens-per-second meter.

Writing a line per step would put a syscall (and with fsync, a disk flush) in the hot loop, so
`MetricsLog` keeps rows in memory and appends them to the JSONL file only on `flush()`, which
the trainer calls at eval/checkpoint time; `close()`, the context manager and an atexit hook
flush the rest, so a normal exit or an exception loses nothing. Each flush is one append-mode
write followed by fsync; a reader skips a final line cut short by a hard kill. A resumed run
first drops the rows written after its checkpoint (`drop_rows_after`), so no step appears twice.

`SteadyClock` times training steps only: the first step (tracing and compiling) and the pauses
for eval and checkpoints are left out, so tokens/s is the rate a long run actually sustains.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from alpha_jit.errors import AlphaJitError
from alpha_jit.train.atomic import atomic_write_bytes


class MetricsError(AlphaJitError, ValueError):
    """A metrics file that cannot be written or read; the message names it."""


def _plain(value: Any) -> Any:
    """numpy scalars and 0-d arrays (a loss read back from the device) become Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


class MetricsLog:
    """Rows appended in memory, written to a JSONL file on flush (never once per step)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise MetricsError(f"metrics path {self.path}: is a directory")
        self._rows: list[dict[str, Any]] = []
        self._closed = False
        atexit.register(self.flush)

    @property
    def pending(self) -> int:
        """Rows buffered but not yet on disk."""
        return len(self._rows)

    def append(self, **row: Any) -> None:
        """Buffer one row (e.g. step=10, loss=2.3); nothing is written until `flush`."""
        if self._closed:
            raise MetricsError(f"metrics log {self.path}: append after close")
        self._rows.append({k: _plain(v) for k, v in row.items()})

    def flush(self) -> None:
        """Append every buffered row to the file in one write, then fsync."""
        if not self._rows:
            return
        # NaN/inf are kept (as JSON's NaN/Infinity) because a diverging loss is worth seeing.
        text = "".join(json.dumps(r, default=str) + "\n" for r in self._rows)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise MetricsError(f"metrics log {self.path}: cannot write ({e})") from e
        self._rows.clear()

    def close(self) -> None:
        self.flush()
        if not self._closed:
            self._closed = True
            atexit.unregister(self.flush)

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a JSONL metrics file; a last line cut short by a kill is skipped."""
    src = Path(path).expanduser()
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MetricsError(f"metrics file {src}: cannot read ({e})") from e
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # a torn final line from a crash mid-flush
            raise MetricsError(f"metrics file {src}: line {i + 1} is not JSON: {e}") from e
    return rows


def drop_rows_after(path: str | os.PathLike[str], step: int) -> int:
    """Rewrite a metrics file keeping only rows with `step <= step`; returns how many went.

    A run killed after its last checkpoint has logged steps it will redo when resumed; those
    rows (and a torn final line) are removed atomically. A missing file is left missing.
    """
    src = Path(path).expanduser()
    if not src.exists():
        return 0
    text = src.read_text(encoding="utf-8", errors="replace")
    rows = read_metrics(src)
    kept = [r for r in rows if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    dropped = len(rows) - len(kept)
    torn = bool(text) and not text.endswith("\n")
    if dropped or torn:
        try:
            atomic_write_bytes(src, "".join(json.dumps(r) + "\n" for r in kept).encode())
        except OSError as e:
            raise MetricsError(f"metrics log {src}: cannot rewrite ({e})") from e
    return dropped


def tokens_per_s(tokens: int, seconds: float) -> float:
    """Throughput, 0.0 for an empty interval rather than a division error."""
    return tokens / seconds if seconds > 0 else 0.0


class Throughput:
    """Tokens/s over the last `window` ticks (and overall) from a monotonic clock.

    Compiled steps return before the GPU finishes, so a rate measured between ticks is the
    submit rate until a value is read; tick right after a sync (a loss read) for device speed.
    """

    def __init__(self, window: int = 20, clock: Any = time.perf_counter):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._clock = clock
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self.reset()

    def reset(self) -> None:
        """Start timing now (call after warm-up/compilation so it is not counted)."""
        self._marks.clear()
        self._start = self._clock()
        self._marks.append((self._start, 0))
        self.total_tokens = 0

    def tick(self, tokens: int) -> float:
        """Record `tokens` processed since the last tick; returns the windowed rate."""
        self.total_tokens += tokens
        self._marks.append((self._clock(), self.total_tokens))
        return self.rate

    @property
    def rate(self) -> float:
        """Tokens/s over the window (the number for a progress bar)."""
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return tokens_per_s(n1 - n0, t1 - t0)

    @property
    def overall(self) -> float:
        """Tokens/s since `reset` (the number for a report)."""
        t = self._marks[-1][0]
        return tokens_per_s(self.total_tokens, t - self._start)

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start


class SteadyClock:
    """Seconds spent in steady-state training steps: `run()` after a sync, `pause()` at the next.

    Compiled steps return before the device finishes, so the clock is only started and paused
    right after a value was read (the loss), when the device has caught up with the host.
    """

    def __init__(self, clock: Any = time.perf_counter):
        self._clock = clock
        self._since: float | None = None
        self.seconds = 0.0

    @property
    def running(self) -> bool:
        return self._since is not None

    def run(self) -> None:
        """Start (or continue) counting; no-op while running."""
        if self._since is None:
            self._since = self._clock()

    def pause(self) -> None:
        """Stop counting (eval, checkpoint, the end); no-op while paused."""
        if self._since is not None:
            self.seconds += self._clock() - self._since
            self._since = None
