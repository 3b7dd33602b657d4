"""`@alpha_jit.compile`: trace on first call (and on a new signature), replay afterwards.

The signature (argument shapes and dtypes, precision) keys a cache of compiled steps. A miss
traces the function into a Graph (forward, autodiff, optimizer), runs the passes, lowers and
plans it, and records one command buffer; every later call with the same signature only writes
the inputs and re-submits that buffer. `ALPHA_JIT_LOG=recompile` says why a retrace happened;
`ALPHA_JIT_LOG=build` prints where each build's time went (`BuildTimes`).

Retraces are bounded: the cache is an LRU of `cache_size` signatures whose evicted steps give
their device memory back, and a function traced more than 8 times warns once, naming the
argument that keeps changing (`max_recompiles=N` makes the (N+1)-th trace an error instead).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alpha_jit import dtypes, guards
from alpha_jit.errors import AlphaJitError, InternalCompilerError, TraceError
from alpha_jit.ir import trace
from alpha_jit.ir.graph import Graph
from alpha_jit.ir.passes.manager import run_passes
from alpha_jit.tensor import StateTensor, Tensor, as_tensor

log = logging.getLogger("alpha_jit.compile")
PRECISIONS = ("f32", "f16", "bf16")
DEFAULT_CACHE_SIZE = 8  # a few bucketed shapes (train, eval, last batch) fit; churn evicts
WARN_TRACES = 8  # traces before the one-time RecompileWarning (max_recompiles=None)
_BUILD_HOOK: Callable[[Any, Any, Any], None] | None = None
_PLAN_ONLY: Any = None  # Capabilities to plan for instead of building (dump-ir --plan-only)
_CALL_HOOK: Callable[[Any, Any, tuple], None] | None = None


class RecompileError(AlphaJitError):
    """A compiled function needed more traces than `aj.compile(max_recompiles=N)` allows."""


class RecompileWarning(UserWarning):
    """A compiled function keeps retracing: each trace compiles and records a new step."""


def set_build_hook(hook: Callable[[Any, Any, Any], None] | None,
                   plan_only: Any = None) -> None:
    """`hook(traced, plan, executable)` runs after each step is built (`alpha-jit dump-ir`).
    With `plan_only` (a Capabilities) a step is only planned for that device, which need not
    be this machine's: kernels generated, memory laid out, nothing created on a device; the
    hook gets executable=None and must end the program (there is nothing to run)."""
    global _BUILD_HOOK, _PLAN_ONLY
    _BUILD_HOOK, _PLAN_ONLY = hook, plan_only


def set_call_hook(hook: Callable[[Any, Any, tuple], None] | None) -> None:
    """`hook(compiled_function, executable, args)` runs before each call of a compiled step
    (`alpha-jit profile` takes over the script's step there)."""
    global _CALL_HOOK
    _CALL_HOOK = hook


@dataclass
class TracedStep:
    """Everything tracing learned: the graph and how it connects to the host."""

    graph: Graph
    signature: tuple
    input_nodes: list[int]
    state: dict[int, StateTensor]  # state key -> holder (reads and writes)
    hparams: dict[tuple, trace.HParam]
    hparam_nodes: dict[tuple, int]
    index_bounds: dict[int, tuple[int, int, str, str, int | None]]
    out_structure: Any  # how to rebuild the user's return value from the flat outputs
    snapshots: list[tuple[str, Graph]] = field(default_factory=list)
    pass_history: list[tuple[str, str, Graph]] = field(default_factory=list)
    grad_updates: list[tuple[Any, Any]] = field(default_factory=list)
    # parameter -> whether it had a kept gradient when traced (the graph reads it if so)
    grad_guard: list[tuple[Any, bool]] = field(default_factory=list)
    memory_budget: int | None = None  # compile(memory_budget=...): bytes the plan may use
    # (object, attribute, value) the trace read (trace.TraceContext.guard)
    guards: list[tuple[Any, str, Any]] = field(default_factory=list)
    _guard_set: guards.GuardSet | None = None  # built on the first guard_holds
    # seconds spent tracing (with autodiff) and in the passes: the build report's first rows
    trace_s: float = 0.0
    passes_s: float = 0.0

    def state_names(self) -> dict[int, str]:
        """State key -> the parameter's (or moment's, gradient's) name."""
        return {k: h.state_name for k, h in self.state.items()}

    def guard_holds(self) -> bool:
        """False when a kept gradient appeared or vanished since tracing, or a guarded
        attribute (a module's `training`, a parameter's `requires_grad`) changed: retrace.
        Checked on every call: one integer comparison unless a guardable value was written
        since it last held (`alpha_jit.guards`)."""
        if self._guard_set is None:
            self._guard_set = guards.GuardSet(self.guards, self.grad_guard)
        return self._guard_set.holds()

    def guard_change(self) -> str:
        """Why `guard_holds` is False, for the retrace log."""
        return guards.GuardSet(self.guards, self.grad_guard).change()

    def leaves(self, args: list[np.ndarray], state_values: dict[int, np.ndarray],
               hparam_values: dict[tuple, float]) -> dict[int, np.ndarray]:
        """Leaf values for the reference interpreter, keyed by node id."""
        g = self.graph
        feed: dict[int, np.ndarray] = {}
        for n in g.g.nodes:
            op = g.op(n)
            if op == "input":
                feed[n] = args[g.attrs(n)["index"]]
            elif op == "state":
                key = g.attrs(n)["key"]
                # not given: the holder's value (the constants a step captured)
                feed[n] = state_values[key] if key in state_values else \
                    _host_value(self.state[key])
            elif op == "hparam":
                feed[n] = np.asarray(hparam_values[g.attrs(n)["key"]], g.dtype(n).np_storage)
        return feed


def _host_value(holder: StateTensor) -> np.ndarray:
    v = holder.numpy()
    return dtypes.bf16_to_f32(v) if holder.dtype == dtypes.bfloat16 else v


def _c_order(a: Any) -> Any:
    """A C-contiguous ndarray of a numpy argument (copied only if it is not already one)."""
    if not isinstance(a, np.ndarray):
        return a  # signature_of names it
    # np.array(order="C") keeps 0-d arrays 0-d (ascontiguousarray would make them (1,))
    return np.array(a, order="C", copy=not a.flags.c_contiguous)


def signature_of(args: tuple, precision: str) -> tuple:
    sig = []
    for i, a in enumerate(args):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"argument {i} of a compiled step must be a numpy array, got "
                            f"{type(a).__name__}")
        sig.append((tuple(a.shape), dtypes.from_numpy(a).name))
    return (tuple(sig), precision)


def _flatten(result: Any) -> tuple[list[Tensor], Any]:
    if result is None:
        return [], None
    if isinstance(result, tuple | list):
        flat, structs = [], []
        for r in result:
            f, s = _flatten(r)
            structs.append((len(flat), len(f), s))
            flat += f
        return flat, (type(result), structs)
    return [as_tensor(result)], "leaf"


def unflatten(values: list[Any], structure: Any) -> Any:
    if structure is None:
        return None
    if structure == "leaf":
        return values[0]
    kind, structs = structure
    parts = [unflatten(values[start:start + n], s) for start, n, s in structs]
    return kind(*parts) if hasattr(kind, "_fields") else kind(parts)  # namedtuples too


def trace_step(fn: Callable, args: tuple, precision: str = "f32",
               loss_scaler: Any = None, passes: list[str] | None = None) -> TracedStep:
    """Run `fn` once with tracer tensors and return the recorded step."""
    sig = signature_of(args, precision)
    ctx = trace.TraceContext()
    ctx.passes = frozenset(passes) if passes is not None else None
    if precision != "f32":
        ctx.autocast = dtypes.dtype(precision)
    ctx.loss_scaler = loss_scaler
    with trace.tracing(ctx):
        inputs = [trace.leaf("input", {"index": i, "name": f"arg{i}"}, a.shape,
                             dtypes.from_numpy(a)) for i, a in enumerate(args)]
        result = fn(*inputs)
        if ctx.grad_ok is not None:
            with ctx.in_phase("opt"):
                loss_scaler.finish(ctx.grad_ok)
        flat, structure = _flatten(result)
        grad_updates = _write_back_grads(ctx)
    guard = [(h, h._grad_holder is not None) for h in ctx.state.values()
             if getattr(h, "requires_grad", False)]
    # a parameter the step read: freezing or unfreezing it changes what backward computes
    for h in ctx.state.values():
        if hasattr(h, "requires_grad"):
            ctx.guard(h, "requires_grad")
    g = ctx.graph
    g.outputs = [t.node for t in flat]
    ctx.snapshots.append(("traced step (fwd + bwd + opt)", g.copy()))
    return TracedStep(g, sig, [t.node for t in inputs], ctx.state, ctx.hparams,
                      ctx.hparam_nodes, ctx.index_bounds, structure, ctx.snapshots,
                      grad_updates=grad_updates, grad_guard=guard, guards=ctx.guards)


def _write_back_grads(ctx: trace.TraceContext) -> list[tuple[Any, Any]]:
    """Gradients still set when the step returns live on as state (PyTorch keeps .grad)."""
    updates = []
    for key, value in list(ctx.grads.items()):
        p = ctx.grad_params[key] if key in ctx.grad_params else ctx.state[key]
        if value is None:
            updates.append((p, None))
            continue
        holder = p._grad_holder
        if holder is None:
            holder = StateTensor(np.zeros(p.shape, np.float32), f"{p.state_name}.grad")
        ctx.write_state(holder, as_tensor(value).node)
        updates.append((p, holder))
    return updates


class CompiledFunction:
    """The callable `@alpha_jit.compile` returns.

    `cache` maps a signature to its executables (one per kept-grad state), least recently used
    first; beyond `cache_size` signatures the oldest is evicted and its device memory freed."""

    def __init__(self, fn: Callable, precision: str = "f32", passes: list[str] | None = None,
                 loss_scale: dict | None = None, cache_size: int | None = DEFAULT_CACHE_SIZE,
                 max_recompiles: int | None = None, memory_budget: int | None = None):
        if precision not in PRECISIONS:
            raise AlphaJitError(f"precision {precision!r} is not supported; "
                                f"choose one of {PRECISIONS}")
        for name, n in (("cache_size", cache_size), ("max_recompiles", max_recompiles)):
            if n is not None and (not isinstance(n, int) or n < 1):
                raise AlphaJitError(f"{name} must be a positive int or None, got {n!r}")
        if memory_budget is not None and (not isinstance(memory_budget, int)
                                          or isinstance(memory_budget, bool)
                                          or memory_budget < 1):
            raise AlphaJitError(f"memory_budget must be a positive number of bytes or None, "
                                f"got {memory_budget!r}")
        functools.update_wrapper(self, fn)
        self.fn, self.precision, self.passes = fn, precision, passes
        self.memory_budget = memory_budget
        self.cache_size, self.max_recompiles = cache_size, max_recompiles
        self.loss_scaler = None
        if precision == "f16":  # f16 gradients need dynamic loss scaling (bf16's range does not)
            from alpha_jit.nn.loss_scale import LossScaler

            self.loss_scaler = LossScaler(**(loss_scale or {}))
        self.cache: OrderedDict[tuple, list[Any]] = OrderedDict()  # LRU: oldest first
        self.traces = 0
        self.evictions = 0
        self.signatures: dict[tuple, int] = {}  # every signature traced -> how many times
        self._warned = False
        self.last_traced: TracedStep | None = None

    def trace(self, *args: np.ndarray) -> TracedStep:
        """Trace and run the passes, without compiling for a device (used by dump-ir, tests)."""
        where = "{}:{} in {}".format(*trace.user_frame())
        # the user's own Python errors while tracing stay theirs; a failed assertion is ours
        t0 = time.perf_counter()
        with internal_errors("tracing", where, (AssertionError,)):
            traced = trace_step(self.fn, args, self.precision, self.loss_scaler, self.passes)
        t1 = time.perf_counter()
        with internal_errors("the passes", where):
            traced.graph, traced.pass_history = run_passes(traced.graph, self.passes)
        traced.trace_s, traced.passes_s = t1 - t0, time.perf_counter() - t1
        for p, holder in traced.grad_updates:
            p._grad_holder = holder
        traced.memory_budget = self.memory_budget
        self.traces += 1
        self.last_traced = traced
        return traced

    def __call__(self, *args: Any) -> Any:
        args = tuple(a if type(a) is np.ndarray and a.flags.c_contiguous else _c_order(a)
                     for a in args)
        sig = signature_of(args, self.precision)
        for exe in self.cache.get(sig, ()):
            if exe.traced.guard_holds():
                self.cache.move_to_end(sig)
                break
        else:
            exe = self._build(sig, args)
        if _CALL_HOOK is not None:
            _CALL_HOOK(self, exe, args)
        return unflatten(exe(list(args)), exe.traced.out_structure)

    def profile(self, *args: Any, steps: int = 10, warmup: int = 3) -> Any:
        """Run this step on `args` about 2 * steps + warmup + 5 times (a training step trains
        that much more) and return where its GPU time goes, per kernel, down to source lines
        (`runtime.profiler.Profile`; `print(p.format(top=10))`). `alpha-jit profile SCRIPT`
        does the same from the command line."""
        from alpha_jit.runtime import profiler

        self(*args)  # traces and builds if needed
        args = tuple(np.array(a, order="C") if isinstance(a, np.ndarray) else a for a in args)
        sig = signature_of(args, self.precision)
        exe = next(e for e in self.cache[sig] if e.traced.guard_holds())
        arrays = list(args)

        def call(recording: Any = None) -> Any:
            return self(*args) if recording is None else exe(arrays, recording)

        return profiler.profile(exe, arrays, steps, warmup, False, call)[0]

    def _build(self, sig: tuple, args: tuple) -> Any:
        self._bound_traces(sig)
        if self.cache and "recompile" in os.environ.get("ALPHA_JIT_LOG", ""):
            if sig in self.cache:
                why = self.cache[sig][-1].traced.guard_change()
            elif sig in self.signatures:
                why = f"this signature was evicted from the cache (cache_size={self.cache_size})"
            else:
                why = _why(self.cache, sig)
            print(f"[alpha_jit] retracing {self.fn.__name__}: {why}", file=sys.stderr)
        from alpha_jit.runtime.step import Executable

        traced = self.trace(*args)
        if _PLAN_ONLY is not None:
            return self._plan_only(traced)
        self.signatures[sig] = self.signatures.get(sig, 0) + 1
        if sig not in self.cache:
            self._evict(keep=(self.cache_size or 0) - 1)  # before building: memory is reused
        with internal_errors("building the step", "{}:{} in {}".format(*trace.user_frame())):
            exe = Executable(traced)
        if "build" in os.environ.get("ALPHA_JIT_LOG", ""):
            print(f"[alpha_jit] built {self.fn.__name__}: {exe.build_times.format()}",
                  file=sys.stderr)
        self.cache.setdefault(sig, []).append(exe)
        self.cache.move_to_end(sig)
        if _BUILD_HOOK is not None:
            _BUILD_HOOK(exe.traced, exe.plan, exe)
        return exe

    def _plan_only(self, traced: TracedStep) -> Any:
        from alpha_jit.runtime.step_plan import plan_step

        with internal_errors("planning the step", "{}:{} in {}".format(*trace.user_frame())):
            plan = plan_step(traced.graph, _PLAN_ONLY, traced.state_names(),
                             memory_budget=traced.memory_budget)
        if _BUILD_HOOK is not None:
            _BUILD_HOOK(traced, plan, None)
        raise AlphaJitError("a plan-only build has no step to run (the build hook must stop "
                            "the program)")

    def _evict(self, keep: int) -> None:
        """Drop least recently used signatures until `keep` remain, freeing their memory."""
        if self.cache_size is None:
            return
        while len(self.cache) > max(keep, 0):
            _, exes = self.cache.popitem(last=False)
            for e in exes:
                e.release()
            self.evictions += 1

    def clear_cache(self) -> None:
        """Release every compiled step (device memory back to the pools); the next call traces."""
        while self.cache:
            for e in self.cache.popitem(last=False)[1]:
                e.release()

    def _bound_traces(self, sig: tuple) -> None:
        """Raise (max_recompiles=N) or warn once (past WARN_TRACES) before one trace too many."""
        n = self.traces + 1
        limit = self.max_recompiles
        if limit is None and (self._warned or n <= WARN_TRACES):
            return
        if limit is not None and n <= limit:
            return
        churn = _churn([*self.signatures, sig])
        if self.evictions:
            churn += (f"; {len(self.signatures)} signatures do not fit cache_size="
                      f"{self.cache_size}, {self.evictions} evicted")
        name = self.fn.__name__
        if limit is not None:
            raise RecompileError(f"{name} needs trace {n} but max_recompiles={limit}: {churn}. "
                                 "Pad or bucket the inputs to fewer shapes, or raise the limit")
        self._warned = True
        from alpha_jit.runtime.device import get_device

        pipelines = get_device().stats["pipelines"]
        kept = ("every step stays cached" if self.cache_size is None
                else f"the cache keeps the {self.cache_size} most recent steps")
        warnings.warn(
            f"{name} is being traced {n} times (more than {WARN_TRACES}): {churn}. Each trace "
            f"compiles and records a new step (the device now holds {pipelines} pipelines, kept "
            f"for reuse; {kept}). Pad or bucket the inputs to a few shapes; "
            "aj.compile(max_recompiles=N) makes this an error", RecompileWarning, stacklevel=4)


def _churn(sigs: list[tuple]) -> str:
    """Which arguments took more than one shape/dtype across `sigs`, most changing first."""
    found = []
    for i in range(max(len(s[0]) for s in sigs)):
        seen = list(dict.fromkeys(s[0][i] for s in sigs if i < len(s[0])))
        if len(seen) < 2:
            continue
        shapes = len({shape for shape, _ in seen})
        dts = len({dt for _, dt in seen})
        if dts == 1:
            what, shown = "shapes", [str(shape) for shape, _ in seen]
        elif shapes == 1:
            what, shown = "dtypes", [dt for _, dt in seen]
        else:
            what, shown = "shapes/dtypes", [f"{dt}{shape}" for shape, dt in seen]
        if len(shown) > 8:  # the first few and the latest say enough
            shown = [*shown[:6], "...", shown[-1]]
        found.append((len(seen), f"argument {i} took {len(seen)} different {what}: "
                                 f"{', '.join(shown)}"))
    if len({len(s[0]) for s in sigs}) > 1:
        found.append((0, "the number of arguments changed"))
    if len({s[1] for s in sigs}) > 1:
        found.append((0, "the precision changed"))
    found.sort(key=lambda f: -f[0])
    return "; ".join(f[1] for f in found) or (
        "the signature did not change (a parameter's kept .grad keeps appearing or vanishing, "
        "or evicted signatures come back)")


@contextlib.contextmanager
def internal_errors(stage: str, where: str,
                    kinds: tuple[type[BaseException], ...] = (Exception,)) -> Iterator[None]:
    """Re-raise an unexpected exception of `kinds` as InternalCompilerError naming the stage
    and the user's call: no bare AssertionError or KeyError from deep inside reaches a user."""
    try:
        yield
    except AlphaJitError:
        raise
    except kinds as e:
        raise InternalCompilerError(stage, f"{type(e).__name__}: {e}", where) from e


def _why(cache: dict, sig: tuple) -> str:
    old = next(reversed(cache))
    diffs = []
    for i, (a, b) in enumerate(zip(old[0], sig[0], strict=False)):
        if a != b:
            diffs.append(f"argument {i} changed from {a[1]}{list(a[0])} to {b[1]}{list(b[0])}")
    if len(old[0]) != len(sig[0]):
        diffs.append(f"number of arguments changed from {len(old[0])} to {len(sig[0])}")
    return "; ".join(diffs) or "precision changed"


def compile(fn: Callable | None = None, *, precision: str = "f32",  # noqa: A001
            passes: list[str] | None = None, loss_scale: dict | None = None,
            cache_size: int | None = DEFAULT_CACHE_SIZE,
            max_recompiles: int | None = None, memory_budget: int | None = None) -> Any:
    """Decorator: `@alpha_jit.compile` or `@alpha_jit.compile(precision="bf16")`.

    precision: "f32", "bf16" (GEMM inputs in bf16, f32 accumulation and master weights) or
    "f16" (the same in f16, plus dynamic loss scaling; `loss_scale` takes LossScaler options,
    e.g. {"init_scale": 2.0**16, "growth_interval": 2000}).
    cache_size: how many input signatures stay compiled (least recently used evicted first,
    its device memory freed; a signature seen again retraces); None keeps every one.
    max_recompiles: None warns once (RecompileWarning) when the function is traced more than
    8 times, naming the argument that keeps changing; N raises RecompileError instead of
    tracing an (N+1)-th time (the first trace counts).
    memory_budget: bytes of device memory the step may plan; over it, LayerNorm/RMSNorm and
    GELU outputs are recomputed in backward instead of kept, and a step still over budget
    raises MemoryPlanError before anything is built."""
    def make(f: Callable) -> CompiledFunction:
        return CompiledFunction(f, precision, passes, loss_scale, cache_size, max_recompiles,
                                memory_budget)

    return make if fn is None else make(fn)


__all__ = ["compile", "CompiledFunction", "TracedStep", "trace_step", "TraceError",
           "RecompileError", "RecompileWarning", "DEFAULT_CACHE_SIZE", "WARN_TRACES"]
