"""Where a step's time goes: per-kernel GPU time from timestamps, joined with the plan.

`profile(exe, args)` runs a compiled step three ways: plainly back to back (the step's wall
time, what training sees), with one timestamp before and one after every dispatch (GPU time per
kernel), and one call at a time on an idle GPU (host overhead: the call until its submit). The
timed recording adds no barrier, so kernels overlap exactly where the plan lets them; but a
bottom-of-pipe timestamp may make a driver drain the pipe, so the report carries the timed
step's wall time beside the plain one and says how far apart they are.

Attribution: each dispatch is an interval [start, end] on the GPU clock; every stretch of time
is shared equally by the dispatches running in it, so kernels that overlap split the overlap,
the per-kernel times sum to the GPU's busy time (the union of the intervals), and the gaps
where no dispatch runs are the idle time. A kernel's row then carries what the plan knows:
family, variant, bytes and FLOPs (achieved GB/s and TFLOP/s), module path, phase and the source
lines of every graph node fused into it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Attribution:
    """One step's timestamps, digested."""

    kernel_ns: dict[int, float]  # kernel index -> GPU time (overlaps shared)
    intervals: list[tuple[int, int, float, float]]  # (kernel, dispatch, start ns, end ns)
    span_ns: float  # from the first to the last stamp (uploads done -> all kernels done)
    busy_ns: float  # union of the dispatch intervals

    @property
    def idle_ns(self) -> float:
        return max(self.span_ns - self.busy_ns, 0.0)


def attribute(stamps: list[tuple[str, float]]) -> Attribution:
    """Digest (label, ns) stamps of a timed recording: labels "begin", "end" and "i.j" twice
    per dispatch (top-of-pipe start, then bottom-of-pipe end)."""
    t_begin = next((t for lab, t in stamps if lab == "begin"), stamps[0][1] if stamps else 0.0)
    t_end = next((t for lab, t in stamps if lab == "end"), stamps[-1][1] if stamps else 0.0)
    opened: dict[str, float] = {}
    intervals = []
    prev_end = t_begin
    for label, t in stamps:
        if label in ("begin", "end"):
            continue
        if label not in opened:
            opened[label] = t
            continue
        start = opened.pop(label)
        # a start stamp cannot precede the step, nor follow the dispatch's own end
        start = min(max(start, t_begin), t)
        i, j = (int(x) for x in label.split("."))
        intervals.append((i, j, start, t))
        prev_end = max(prev_end, t)
    kernel_ns: dict[int, float] = defaultdict(float)
    events = sorted([(s, 1, n) for n, (_, _, s, _) in enumerate(intervals)]
                    + [(e, 0, n) for n, (_, _, _, e) in enumerate(intervals)])
    active: set[int] = set()
    busy = 0.0
    last = events[0][0] if events else 0.0
    for t, kind, n in events:  # sweep: each stretch is split among what runs in it
        if active and t > last:
            share = (t - last) / len(active)
            for m in active:
                kernel_ns[intervals[m][0]] += share
            busy += t - last
        last = t
        if kind:
            active.add(n)
        else:
            active.discard(n)
    for i, _, _, _ in intervals:
        kernel_ns.setdefault(i, 0.0)
    span = max(t_end, prev_end) - t_begin
    return Attribution(dict(kernel_ns), intervals, span, busy)


@dataclass(frozen=True)
class ProfileRow:
    kernel: int
    name: str
    family: str
    variant: str
    calls: int  # dispatches of this kernel per step
    gpu_ms: float  # per step, mean over the timed steps
    percent: float  # of the GPU busy time
    gb_s: float | None
    tflop_s: float | None
    bytes: int
    flops: int
    module: str
    phase: str
    sources: list[str]


@dataclass(frozen=True)
class Profile:
    device: str
    steps: int
    step_ms: float  # wall time per step, plain recording, back to back (what training sees)
    timed_step_ms: float  # the same with per-dispatch timestamps
    gpu_span_ms: float  # uploads done -> all kernels done, timed recording
    gpu_busy_ms: float  # some dispatch running
    idle_ms: float  # between dispatches: no dispatch running
    host_overhead_ms: float  # the call until its submit returned, GPU idle (median)
    submit_ms: float  # the driver's vkQueueSubmit within that call (median)
    dispatches: int
    serialized: bool
    rows: list[ProfileRow]
    note: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def format(self, top: int | None = None) -> str:
        lines = [f"alpha-jit profile on {self.device}: {self.steps} timed steps, "
                 f"{len(self.rows)} kernels, {self.dispatches} dispatches per step",
                 f"  step (wall, back to back)  {self.step_ms:9.3f} ms",
                 f"  step with timestamps       {self.timed_step_ms:9.3f} ms",
                 f"  GPU span                   {self.gpu_span_ms:9.3f} ms",
                 f"  GPU busy                   {self.gpu_busy_ms:9.3f} ms",
                 f"  idle between dispatches    {self.idle_ms:9.3f} ms",
                 f"  host overhead per call     {self.host_overhead_ms:9.3f} ms",
                 f"    of which vkQueueSubmit   {self.submit_ms:9.3f} ms",
                 f"  {self.note}", ""]
        head = (f"{'#':>5} {'family':<11} {'variant':<30} {'calls':>5} {'GPU ms':>9} {'%':>6} "
                f"{'GB/s':>8} {'TFLOP/s':>8}  {'phase':<8} {'module':<24} sources")
        lines += [head, "-" * len(head)]
        for r in self.rows[:top]:
            gb = f"{r.gb_s:8.1f}" if r.gb_s is not None else f"{'-':>8}"
            tf = f"{r.tflop_s:8.3f}" if r.tflop_s is not None else f"{'-':>8}"
            src = ", ".join(_short(s) for s in r.sources[:4])
            if len(r.sources) > 4:
                src += f", +{len(r.sources) - 4}"
            lines.append(f"{r.kernel:>5} {r.family:<11} {r.variant[:30]:<30} {r.calls:>5} "
                         f"{r.gpu_ms:9.4f} {r.percent:6.2f} {gb} {tf}  {r.phase[:8]:<8} "
                         f"{r.module[:24]:<24} {src}")
        if top is not None and len(self.rows) > top:
            rest = self.rows[top:]
            lines.append(f"  ... {len(rest)} more kernels, {sum(r.gpu_ms for r in rest):.3f} ms "
                         f"({sum(r.percent for r in rest):.1f}%)")
        return "\n".join(lines)


def _short(source: str) -> str:
    """A source without folders: "train.py:56", or "train.py:56 (layers.py:30)"."""
    base, sep, model = source.partition(" (")
    path, _, line = base.rpartition(":")
    return f"{path.rsplit('/', 1)[-1]}:{line}{sep}{model}"


def profile(exe: Any, args: list[Any], steps: int = 10, warmup: int = 3,
            serialize: bool = False, call: Any = None) -> tuple[Profile, Attribution]:
    """Profile `exe` (an Executable) on `args`; `call(recording)` runs one step (default: the
    executable itself) and may go through the user's compiled function. Returns the report and
    the last timed step's attribution (for a trace file)."""
    steps = max(1, steps)
    if call is None:
        def call(recording: Any = None) -> Any:
            return exe(args, recording)
    dev = exe.device
    for _ in range(warmup):
        call()
    dev.wait(exe.last_value)
    t0 = time.perf_counter()  # plain recording, back to back, as a training loop runs it
    for _ in range(steps):
        call()
    dev.wait(exe.last_value)
    step_ms = (time.perf_counter() - t0) * 1e3 / steps
    host, submit = [], []
    for _ in range(min(steps, 5)):  # host overhead: the GPU idle, so no wait is counted
        dev.wait(exe.last_value)
        t = time.perf_counter()
        call()
        host.append((time.perf_counter() - t) * 1e3)
        submit.append(dev.last_submit_s * 1e3)
    dev.wait(exe.last_value)
    rec = exe.timed_recording(serialize)
    kernel_ns: dict[int, float] = defaultdict(float)
    span = busy = 0.0
    timed_ms = []
    att = None
    for _ in range(steps):
        t = time.perf_counter()
        call(rec)
        dev.wait(exe.last_value)
        timed_ms.append((time.perf_counter() - t) * 1e3)
        att = attribute(rec.timestamps())
        for i, ns in att.kernel_ns.items():
            kernel_ns[i] += ns / steps
        span += att.span_ns / steps
        busy += att.busy_ns / steps
    assert att is not None
    rows = _rows(exe.plan, kernel_ns, busy)
    timed_step = statistics.median(timed_ms)
    note = ("timestamps add no barrier: kernels overlap where the plan lets them and share "
            "the time they overlap")
    if serialize:
        note = ("--serialize: a barrier before every kernel, so each time is its own, but the "
                "step is not the one that trains")
    change = timed_step / step_ms - 1
    if abs(change) > 0.1:
        note += (f"; with timestamps the step takes {abs(change):.0%} "
                 f"{'longer' if change > 0 else 'less'} than without (they drain the pipe "
                 "after each dispatch, which changes how this driver overlaps kernels): "
                 "compare shares, not sums, with the wall time")
    prof = Profile(exe.device.caps.name, steps, step_ms, timed_step, span / 1e6, busy / 1e6,
                   max(span - busy, 0.0) / 1e6, statistics.median(host),
                   statistics.median(submit),
                   sum(len(b.dispatches) for b in exe.binaries), serialize, rows, note)
    return prof, att


def _rows(plan: Any, kernel_ns: dict[int, float], busy_ns: float) -> list[ProfileRow]:
    rows = []
    for info in plan.kernels:
        ns = kernel_ns.get(info.id, 0.0)
        s = ns / 1e9
        rows.append(ProfileRow(
            info.id, info.name, info.family, info.variant, len(info.grid), ns / 1e6,
            100.0 * ns / busy_ns if busy_ns > 0 else 0.0,
            info.bytes / s / 1e9 if s > 0 else None,
            info.flops / s / 1e12 if s > 0 and info.flops else None,
            info.bytes, info.flops, info.module, info.phase, list(info.sources)))
    return sorted(rows, key=lambda r: (-r.gpu_ms, r.kernel))


def write_trace(path: str | Path, plan: Any, att: Attribution) -> None:
    """One step as a Chrome/Perfetto trace: a row per dispatch, named by module path and
    source line; overlapping dispatches go on separate lanes."""
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0,
                                     "args": {"name": f"alpha_jit on {plan.caps.name}"}}]
    t0 = min((s for _, _, s, _ in att.intervals), default=0.0)
    lanes: list[float] = []  # end time of the last event on each lane
    for i, j, s, e in sorted(att.intervals, key=lambda x: x[2]):
        info = plan.kernels[i]
        lane = next((n for n, end in enumerate(lanes) if end <= s), len(lanes))
        if lane == len(lanes):
            lanes.append(e)
        else:
            lanes[lane] = e
        where = _short(info.sources[0]) if info.sources else "?"
        label = f"{info.module or info.name} {where}"
        events.append({"name": label, "cat": info.family, "ph": "X", "pid": 0, "tid": lane,
                       "ts": (s - t0) / 1e3, "dur": max(e - s, 0.0) / 1e3,
                       "args": {"kernel": i, "dispatch": j, "name": info.name,
                                "variant": info.variant, "phase": info.phase,
                                "sources": list(info.sources), "bytes": info.bytes,
                                "flops": info.flops}})
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
