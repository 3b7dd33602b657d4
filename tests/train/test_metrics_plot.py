"""Buffered JSONL metrics, the throughput meter, and the loss-curve PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alpha_jit.train.metrics import (
    MetricsError,
    MetricsLog,
    SteadyClock,
    Throughput,
    drop_rows_after,
    read_metrics,
    tokens_per_s,
)
from alpha_jit.train.plot import plot_loss_curve


def test_rows_buffered_until_flush_then_appended(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(5):
        log.append(step=step, loss=np.float32(3.0 - step * 0.1))
    assert not path.exists() and log.pending == 5  # nothing written per step
    log.flush()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5))
    assert rows[1]["loss"] == pytest.approx(2.9)
    size = path.stat().st_size
    log.append(step=5, loss=2.4, val_loss=2.6)
    assert path.stat().st_size == size  # still buffered
    log.close()
    assert len(read_metrics(path)) == 6
    with pytest.raises(MetricsError, match="append after close"):
        log.append(step=6)


def test_second_log_appends_and_context_manager_flushes(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log:
        log.append(step=0, loss=1.0)
    with MetricsLog(path) as log:  # a resumed run appends to the same file
        log.append(step=1, loss=float("nan"))
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1] and math.isnan(rows[1]["loss"])


def test_flush_on_exception_in_context(tmp_path):
    path = tmp_path / "m.jsonl"
    with pytest.raises(RuntimeError):
        with MetricsLog(path) as log:
            log.append(step=0, loss=1.0)
            raise RuntimeError("training crashed")
    assert read_metrics(path) == [{"step": 0, "loss": 1.0}]


def test_read_metrics_skips_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    assert read_metrics(path) == [{"step": 0, "loss": 1.0}]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(MetricsError, match="line 2 is not JSON"):
        read_metrics(path)


def test_directory_path_is_an_error(tmp_path):
    with pytest.raises(MetricsError, match="is a directory"):
        MetricsLog(tmp_path)


def test_throughput():
    now = [0.0]
    meter = Throughput(window=2, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 1.0
        meter.tick(100)
    now[0] += 1.0
    rate = meter.tick(400)  # the window covers the last two ticks: 500 tokens in 2 s
    assert rate == pytest.approx(250.0)
    assert meter.overall == pytest.approx(800 / 5)
    assert tokens_per_s(1000, 0.5) == 2000.0 and tokens_per_s(10, 0.0) == 0.0


def test_plot_writes_png_from_file_and_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log:
        for step in range(50):
            log.append(step=step, loss=3.0 * math.exp(-step / 20))
            if step % 10 == 0:
                log.append(step=step, val_loss=3.1 * math.exp(-step / 20))
        log.append(step=50, loss=float("nan"))  # NaN is left out, not plotted
    png = plot_loss_curve(path, tmp_path / "out" / "loss.png", entropy=2.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in png.parent.iterdir()) == ["loss.png"]  # no temp left
    png2 = plot_loss_curve(read_metrics(path), tmp_path / "rows.png", title="rows")
    assert png2.stat().st_size > 1000
    with pytest.raises(MetricsError, match="no rows"):
        plot_loss_curve([{"step": 0}], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_drop_rows_after_a_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert drop_rows_after(path, 5) == 0 and not path.exists()  # nothing to clean
    rows = [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 9)] + [{"step": 6, "val_loss": 2}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '{"step": 9, "lo')  # a torn last line from a kill mid-flush
    assert drop_rows_after(path, 5) == 4
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert path.read_text().endswith("\n")  # the next append starts on a fresh line
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert drop_rows_after(path, 5) == 0


def test_steady_clock_counts_only_running_intervals():
    now = [0.0]
    clock = SteadyClock(clock=lambda: now[0])
    now[0] = 5.0  # compiling: not counted
    clock.run()
    now[0] = 7.0
    clock.pause()
    clock.pause()  # idempotent
    now[0] = 20.0  # eval + checkpoint: not counted
    clock.run()
    clock.run()
    now[0] = 21.5
    clock.pause()
    assert clock.seconds == pytest.approx(3.5) and not clock.running
