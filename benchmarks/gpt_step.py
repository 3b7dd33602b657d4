"""GPT step bench: one training step of alpha_jit against PyTorch eager and torch.compile.

Why: the step is what a user waits for. For one config and precision this runs the same step
(benchmarks/training.py: same weights, same batch, AdamW, clip) on each side and reports, per
side, a row with:

- ms/step: median wall time of N steps after warm-up, each step synced (alpha_jit: the loss is
  read back; torch: `torch.cuda.synchronize()`), tokens/s, and MFU against the spec-sheet peak
  (FLOPs formula in benchmarks/configs.py, peaks in benchmarks/peaks.py);
- memory: alpha_jit's planned bytes (`Executable.planned_bytes`) and the bytes its device
  actually allocated (the device is recreated before each measurement so the count is this
  step's alone); PyTorch's `torch.cuda.max_memory_allocated()`;
- compile time: the first call in this process (to the first loss read), and for alpha_jit a
  cold and a warm one in fresh processes (benchmarks/compile_probe.py); torch.compile's first
  call runs with fresh inductor/triton caches, so it is its cold compile;
- host overhead: with the GPU idle, the time the step call takes to return (alpha_jit returns
  right after vkQueueSubmit; eager PyTorch after launching every kernel).

Parity guard: the first `parity_steps` losses (10) of alpha_jit and of PyTorch eager, from the
same weights on the same batch, must agree to `parity_tol` (1e-2) relative at every step; a
bf16 row that misses it is still valid when it agrees with PyTorch's f32 run (same weights and
batch) to `parity_tol`, or no worse than eager's bf16 losses do, and says so (`_verdicts`:
bf16 trajectories drift, eager and torch.compile themselves ended up to 1.1% apart on `gpt2`).
A row that disagrees is INVALID: it shows both losses and no speed. Without CUDA the guard runs
eager PyTorch on the CPU when that is cheap (the tiny config); otherwise the alpha_jit row is
"unchecked". A side that cannot run (out of memory, a
buffer over the device's limits) is a "does not run" row carrying the error; the bench goes on.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from benchmarks import training
from benchmarks.configs import BenchConfig, count_params, step_flops
from benchmarks.environment import Environment, import_torch, log, median, short_error
from benchmarks.peaks import mfu as mfu_of
from benchmarks.report import StepRow

ALPHA, EAGER, COMPILE = "alpha_jit", "torch_eager", "torch_compile"
CPU_GUARD_MAX_FLOPS = 2e11  # model FLOPs the CPU-only parity guard may spend (tiny: 7e9)


@dataclass(frozen=True)
class StepOptions:
    steps: int = 20  # timed steps (the median is reported)
    warmup: int = 5  # untimed steps after the parity steps
    parity_steps: int = 10
    parity_tol: float = 1e-2
    host_samples: int = 10
    compile_time: bool = True  # cold/warm compile probes in fresh processes (alpha_jit)
    torch_compile: bool = True
    seed: int = 0
    probe_timeout_s: float = 900.0


@dataclass(frozen=True)
class Parity:
    """The verdict of comparing two sides' losses step by step."""

    checked: bool
    ok: bool  # True when unchecked: nothing says the row is wrong
    max_rel: float | None
    steps: int
    tol: float
    reference: str  # what the losses were compared with
    why: str | None  # why unchecked, or how they disagree


def parity_guard(losses: Sequence[float], reference: Sequence[float], tol: float,
                 reference_name: str) -> Parity:
    """Compare losses step by step: every one finite, every relative difference <= tol."""
    n = min(len(losses), len(reference))
    if n == 0:
        return Parity(False, True, None, 0, tol, reference_name, "no losses to compare")
    worst, at = 0.0, 0
    for i in range(n):
        a, r = float(losses[i]), float(reference[i])
        if not (math.isfinite(a) and math.isfinite(r)):
            return Parity(True, False, math.inf, n, tol, reference_name,
                          f"step {i + 1}: loss {a} vs {reference_name} {r} (not finite)")
        rel = abs(a - r) / max(abs(r), 1e-30)
        if rel > worst:
            worst, at = rel, i
    if worst > tol:
        return Parity(True, False, worst, n, tol, reference_name,
                      f"losses disagree with {reference_name}: step {at + 1} loss "
                      f"{float(losses[at]):.6g} vs {float(reference[at]):.6g} (relative "
                      f"{worst:.3g} > {tol:g}); step {n}: {float(losses[n - 1]):.6g} vs "
                      f"{float(reference[n - 1]):.6g}")
    return Parity(True, True, worst, n, tol, reference_name, None)


def unchecked(why: str, tol: float, reference: str = EAGER) -> Parity:
    return Parity(False, True, None, 0, tol, reference, why)


@dataclass(frozen=True)
class SideRun:
    """What measuring one side produced (error set: it did not run, the rest is partial)."""

    side: str
    losses: tuple[float, ...] = ()
    step_ms: tuple[float, ...] = ()
    host_ms: tuple[float, ...] = ()
    first_call_s: float | None = None
    mem: dict[str, int | None] = field(default_factory=dict)
    error: str | None = None
    device: str | None = None  # where it ran ('cuda', 'cpu', alpha_jit's device)
    submit_ms: tuple[float, ...] = ()  # alpha_jit: the driver's vkQueueSubmit within host_ms

    @property
    def ms(self) -> float | None:
        return median(self.step_ms) if self.step_ms else None


# ---- alpha_jit ----------------------------------------------------------------------------------
def measure_alpha(model: Any, precision: str, xy: tuple[np.ndarray, np.ndarray],
                  loss_steps: int, warmup: int, steps: int, host_samples: int) -> SideRun:
    """Compile and run alpha_jit's step on a fresh device: losses, step times, host overhead,
    planned and allocated memory. The device is recreated before (so the allocation count is
    this step's) and after (so its memory goes back for PyTorch)."""
    from alpha_jit.runtime.device import get_device, reset_device

    reset_device()
    x, y = xy
    step = training.alpha_step(model, precision)
    losses: list[float] = []
    times: list[float] = []
    host: list[float] = []
    submit: list[float] = []
    first = None
    mem: dict[str, int | None] = {}
    try:
        t0 = time.perf_counter()
        losses.append(float(step(x, y)))
        first = time.perf_counter() - t0
        for _ in range(loss_steps - 1):
            losses.append(float(step(x, y)))
        for _ in range(warmup):
            float(step(x, y))
        for _ in range(steps):
            t0 = time.perf_counter()
            float(step(x, y))  # reading the loss waits for the step
            times.append((time.perf_counter() - t0) * 1e3)
        for _ in range(host_samples):  # the previous loss was read: the GPU is idle
            t0 = time.perf_counter()
            handle = step(x, y)
            host.append((time.perf_counter() - t0) * 1e3)
            submit.append(get_device().last_submit_s * 1e3)
            float(handle)
        exe = next(e for es in step.cache.values() for e in es)
        mem = {"mem_planned_bytes": int(exe.planned_bytes),
               "mem_allocated_bytes": int(get_device().memory.allocated_bytes())}
        error = None
    except Exception as e:  # e.g. a buffer over maxMemoryAllocationSize: a row, not the end
        error = short_error(e)
    finally:
        step.clear_cache()
        del step
        gc.collect()
        reset_device()
    return SideRun(ALPHA, tuple(losses), tuple(times), tuple(host), first, mem, error,
                   submit_ms=tuple(submit))


# ---- PyTorch ------------------------------------------------------------------------------------
def measure_torch(bc: BenchConfig, precision: str, init: dict[str, np.ndarray],
                  xy: tuple[np.ndarray, np.ndarray], device: str, compiled: bool,
                  loss_steps: int, warmup: int, steps: int, host_samples: int) -> SideRun:
    """Run the PyTorch step from `init`; on the CPU only the losses (the parity guard)."""
    torch = import_torch()
    side = COMPILE if compiled else EAGER
    cuda = device.startswith("cuda")
    model = step = None
    losses: list[float] = []
    times: list[float] = []
    host: list[float] = []
    first = None
    mem: dict[str, int | None] = {}
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if compiled:  # forget earlier compiles: each row compiles afresh, with static shapes
            torch._dynamo.reset()
        model = training.torch_model(bc, init, device)
        step = training.torch_step(model, precision, device, compiled)
        x, y = training.torch_batch(xy, device)
        t0 = time.perf_counter()
        losses.append(step(x, y).item())
        first = time.perf_counter() - t0
        for _ in range(loss_steps - 1):
            losses.append(step(x, y).item())
        if cuda:
            for _ in range(warmup):
                step(x, y)
            for _ in range(steps):
                training.torch_sync(device)
                t0 = time.perf_counter()
                step(x, y)
                training.torch_sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            for _ in range(host_samples):
                training.torch_sync(device)
                t0 = time.perf_counter()
                step(x, y)
                host.append((time.perf_counter() - t0) * 1e3)
            training.torch_sync(device)
            mem = {"mem_peak_bytes": int(torch.cuda.max_memory_allocated())}
        error = None
    except Exception as e:  # torch.cuda.OutOfMemoryError and friends
        error = short_error(e)
    finally:
        del model, step
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()  # give the memory back before alpha_jit's next step
    return SideRun(side, tuple(losses), tuple(times), tuple(host), first, mem, error, device)


# ---- one config ---------------------------------------------------------------------------------
def bench_config(bc: BenchConfig, precision: str, env: Environment, opts: StepOptions,
                 guard: Callable[..., Parity] = parity_guard,
                 kind: str = "step") -> list[StepRow]:
    """Measure one config at one precision on every side; one row per side. `guard` compares
    losses (the parity check; tests pass one that sees deliberately mismatched losses)."""
    if precision not in training.STEP_PRECISIONS:
        raise ValueError(f"the step bench runs {training.STEP_PRECISIONS}, not {precision!r}")
    log(f"step {bc.label} {precision}: building the alpha_jit model")
    model = training.alpha_model(bc, opts.seed)
    init = training.weights(model)  # before any step: both sides start here
    xy = training.batch(bc, opts.seed)
    n = opts.parity_steps
    if env.why_no_alpha:
        alpha = SideRun(ALPHA, error=env.why_no_alpha)
    else:
        log(f"step {bc.label} {precision}: alpha_jit")
        alpha = measure_alpha(model, precision, xy, n, opts.warmup, opts.steps, opts.host_samples)
        alpha = replace(alpha, device=env.alpha_device)
    del model
    runs = {ALPHA: alpha}
    flops = step_flops(bc.model, bc.batch, bc.seq)
    torch_why = None
    if env.torch_version is None:
        torch_why = env.why_no_torch
    elif env.torch_timed:
        for side in (EAGER, COMPILE):
            if side == COMPILE and not opts.torch_compile:
                continue
            log(f"step {bc.label} {precision}: {side}")
            runs[side] = measure_torch(bc, precision, init, xy, "cuda", side == COMPILE, n,
                                       opts.warmup, opts.steps, opts.host_samples)
    elif flops * n <= CPU_GUARD_MAX_FLOPS:
        log(f"step {bc.label} {precision}: torch eager on the CPU (the parity guard only)")
        runs[EAGER] = measure_torch(bc, precision, init, xy, "cpu", False, n, 0, 0, 0)
    else:
        torch_why = (f"{env.why_no_torch}; the parity guard would run PyTorch on the CPU, and "
                     f"{n} steps of {bc.label} ({flops * n:.2g} FLOPs) exceed the "
                     f"{CPU_GUARD_MAX_FLOPS:.0e} it may spend there")
    f32 = None
    if precision != "f32" and env.torch_timed and EAGER in runs and runs[EAGER].error is None:
        log(f"step {bc.label} {precision}: torch eager in f32 (the parity guard's arbiter)")
        f32 = measure_torch(bc, "f32", init, xy, "cuda", False, n, 0, 0, 0)
    tol = opts.parity_tol
    verdicts = _verdicts(runs, guard, tol, torch_why, f32)
    alpha_ok = alpha.error is None and _finite(alpha.losses) and verdicts[ALPHA].ok
    compile_times = _compile_times(bc, precision, opts, alpha_ok)
    speeds = {s: r.ms for s, r in runs.items() if r.error is None and r.ms is not None
              and _finite(r.losses) and verdicts[s].ok}
    # PyTorch's rows exist where PyTorch ran (on the CPU: the guard's losses, no times)
    return [side_row(bc, precision, env, runs[side], verdicts.get(side), speeds, flops,
                     compile_times if side == ALPHA else None, kind)
            for side in (ALPHA, EAGER, COMPILE) if side in runs]


def _verdicts(runs: dict[str, SideRun], guard: Callable[..., Parity], tol: float,
              torch_why: str | None, f32: SideRun | None = None) -> dict[str, Parity]:
    """alpha_jit against PyTorch eager (the reference), with PyTorch in f32 as the arbiter.

    In bf16 two correct implementations drift apart step by step, and on one batch repeated at
    lr 6e-4 the drift grows fast: on the H200, `gpt2` B8 eager and torch.compile ended 0.2% to
    1.1% apart after 10 steps, run to run. So a bf16 alpha_jit row that misses `tol` against
    eager is still valid when its losses agree with PyTorch's f32 trajectory (`f32`, same
    weights and batch) within `tol`, or no worse than eager's bf16 losses do; the row says so.
    A torch.compile row that drifts from eager is PyTorch's own
    measurement: it keeps its time and carries the drift as a note (`Parity.ok` True, `why`)."""
    eager = runs.get(EAGER)
    out = {EAGER: unchecked("this is the reference", tol)}
    if eager is None or eager.error is not None:
        why = f"{EAGER} did not run: {eager.error}" if eager is not None else (
            torch_why or "no PyTorch reference")
        for side in (ALPHA, COMPILE):
            if side in runs and runs[side].error is None:
                out[side] = unchecked(why, tol)
        return out
    ref = f"{EAGER} on {eager.device}"
    comp = runs.get(COMPILE)
    if comp is not None and comp.error is None and comp.losses:
        v = guard(comp.losses, eager.losses, tol, ref)
        out[COMPILE] = v if v.ok else Parity(
            True, True, v.max_rel, v.steps, tol, ref,
            f"PyTorch's own paths drift apart in {v.steps} steps: {v.why}")
    run = runs.get(ALPHA)
    if run is not None and run.error is None:
        v = guard(run.losses, eager.losses, tol, ref)
        if not v.ok and v.max_rel is not None and math.isfinite(v.max_rel) \
                and f32 is not None and f32.error is None and f32.losses:
            ours = guard(run.losses, f32.losses, 0.0, "f32").max_rel
            theirs = guard(eager.losses, f32.losses, 0.0, "f32").max_rel
            if ours is not None and theirs is not None and ours <= max(tol, theirs):
                closer = "closer to it than" if ours <= theirs else f"within {tol:g} of it, as"
                v = Parity(True, True, v.max_rel, v.steps, tol, ref,
                           f"{v.why}; against PyTorch in f32 (same weights and batch) alpha_jit "
                           f"is off by {ours:.2g} and {EAGER} bf16 by {theirs:.2g}: alpha_jit "
                           f"is {closer} the reference is")
        out[ALPHA] = v
    return out


def _compile_times(bc: BenchConfig, precision: str, opts: StepOptions,
                   alpha_ok: bool) -> tuple[float | None, float | None, str | None]:
    from benchmarks import compile_probe

    compile_probe.last_builds.clear()  # a row without probes must not show another row's
    if not opts.compile_time:
        return None, None, "not measured (--no-compile-time)"
    if not alpha_ok:
        return None, None, "alpha_jit's step did not run, or is invalid"
    log(f"step {bc.label} {precision}: alpha_jit cold and warm compile (two fresh processes)")
    return compile_probe.measure(bc, precision, opts.seed, opts.probe_timeout_s)


def _finite(losses: Sequence[float]) -> bool:
    return bool(losses) and all(math.isfinite(v) for v in losses)


def side_row(bc: BenchConfig, precision: str, env: Environment, run: SideRun,
             verdict: Parity | None, speeds: dict[str, float], flops: int,
             compile_times: tuple[float | None, float | None, str | None] | None,
             kind: str) -> StepRow:
    """One side's row: its status, and every measured column or the reason it is empty.
    `speeds` holds the valid median ms of every side (the ratios' other halves)."""
    why: dict[str, str] = {}
    notes: list[str] = []
    status, valid, error = "ok", True, run.error
    if run.error:
        status, valid = "does not run", False
    elif not _finite(run.losses):
        status, valid, error = "INVALID", False, f"non-finite loss: {list(run.losses)}"
    elif verdict is not None and not verdict.ok:
        status, valid, error = "INVALID", False, f"parity guard failed: {verdict.why}"
    elif verdict is not None and not verdict.checked and run.side != EAGER and kind == "step":
        status = "unchecked"
        notes.append(f"losses not compared with PyTorch: {verdict.why}")
    elif verdict is not None and verdict.checked and verdict.why:
        notes.append(f"parity: {verdict.why}")
    ms = speeds.get(run.side)
    if ms is None:  # an invalid row gets no speed at all, only the reason
        reason = error or ("not measured" if run.side == ALPHA else
                           f"timed on CUDA only: {env.why_no_torch}")
        for col in ("ms_per_step", "tokens_per_s", "mfu", "peak_tflops", "host_overhead_ms"):
            why[col] = reason
    mfu = peak = None
    if ms is not None:
        device_name = env.alpha_device if run.side == ALPHA else env.torch_device
        mfu, mfu_why = mfu_of(flops, ms / 1e3, device_name, precision)
        if mfu is None:
            why["mfu"] = why["peak_tflops"] = mfu_why or "no peak"
        else:
            peak = flops / (ms / 1e3) / mfu / 1e12
    host = median(run.host_ms) if run.host_ms and ms is not None else None
    if ms is not None and host is None:
        why["host_overhead_ms"] = "not measured"
    if host is not None and run.submit_ms:  # Python's share and the driver's, apart
        notes.append(f"host overhead {host:.3f} ms per call, of which the driver's "
                     f"vkQueueSubmit {median(run.submit_ms):.3f} ms")
    mem: dict[str, int | None] = {}
    for col, alpha_only in (("mem_planned_bytes", True), ("mem_allocated_bytes", True),
                            ("mem_peak_bytes", False)):
        mem[col] = run.mem.get(col)
        if mem[col] is not None:
            continue
        if alpha_only != (run.side == ALPHA):
            why[col] = ("alpha_jit only (PyTorch's is mem_peak_bytes)" if alpha_only else
                        "PyTorch only (alpha_jit's are mem_planned_bytes, mem_allocated_bytes)")
        else:
            why[col] = error or f"measured on CUDA only: {env.why_no_torch}"
    cold = warm = None
    if not valid:
        why["compile_cold_s"] = why["compile_warm_s"] = error or status
    elif compile_times is not None:  # alpha_jit: the two fresh processes
        cold, warm, probe_why = compile_times
        if cold is None:
            why["compile_cold_s"] = probe_why or "not measured"
        if warm is None:
            why["compile_warm_s"] = probe_why or "not measured"
        if probe_why and cold is not None:
            notes.append(f"compile probe: {probe_why}")
        from benchmarks.compile_probe import last_builds

        for which in ("cold", "warm"):  # where each compile goes, for whoever makes it faster
            if last_builds.get(which):
                notes.append(f"{which} build {last_builds[which]}")
    elif run.side == COMPILE:
        cold = run.first_call_s  # its caches are fresh (environment.cold_inductor_cache)
        why["compile_warm_s"] = ("not measured: a warm torch.compile needs a second process "
                                 "sharing the first one's inductor cache")
        if env.inductor_cache and "warm" in env.inductor_cache:
            notes.append(env.inductor_cache)
    elif run.side == EAGER:
        why["compile_cold_s"] = why["compile_warm_s"] = "eager PyTorch compiles nothing"
    else:
        why["compile_cold_s"] = why["compile_warm_s"] = f"not measured for {kind} rows"
    first_call = run.first_call_s if valid and run.device != "cpu" else None
    if first_call is None:
        why["first_call_s"] = error or ("PyTorch ran on the CPU (the parity guard only)"
                                        if run.device == "cpu" else "did not run")
    ratios: dict[str, float | None] = {}
    for col, other in (("vs_torch_eager", EAGER), ("vs_torch_compile", COMPILE)):
        theirs = speeds.get(other)
        ok = ms is not None and theirs is not None and run.side != other
        ratios[col] = theirs / ms if ok else None  # type: ignore[operator]
        if not ok:
            why[col] = (f"this row is {other}" if run.side == other else
                        why.get("ms_per_step") or
                        (f"{other} has no valid time" if env.torch_timed else
                         f"PyTorch is not timed: {env.why_no_torch}"))
    checked = verdict is not None and verdict.checked
    if not checked:
        why["parity_max_rel"] = why["parity_reference"] = (
            verdict.why if verdict is not None and verdict.why else error or "not compared")
    if not run.losses:
        why["loss_first"] = why["loss_last"] = error or "did not run"
    return StepRow(
        valid, status, error, why, tuple(notes), **env.json_fields(), side=run.side,
        config=bc.name, precision=precision, batch=bc.batch, seq=bc.seq,
        params=count_params(bc.model), tokens_per_step=bc.tokens, flops_per_step=flops,
        ms_per_step=ms, steps_timed=len(run.step_ms) if ms is not None else 0,
        tokens_per_s=bc.tokens / (ms / 1e3) if ms is not None else None, mfu=mfu,
        peak_tflops=peak, first_call_s=first_call, compile_cold_s=cold, compile_warm_s=warm,
        host_overhead_ms=host, loss_first=run.losses[0] if run.losses else None,
        loss_last=run.losses[-1] if run.losses else None, parity_checked=checked,
        parity_max_rel=verdict.max_rel if checked and verdict is not None else None,
        parity_tol=verdict.tol if verdict is not None else None,
        parity_steps=verdict.steps if checked and verdict is not None else 0,
        parity_reference=verdict.reference if checked and verdict is not None else None,
        kind=kind, **mem, **ratios)
