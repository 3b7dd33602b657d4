"""`@alpha_jit.compile`: trace on first call (and on a new signature), replay afterwards.

The signature (argument shapes and dtypes, precision) keys a cache of compiled steps. A miss
traces the function into a Graph (forward, autodiff, optimizer), runs the passes, lowers and
plans it, and records one command buffer; every later call with the same signature only writes
the inputs and re-submits that buffer. `ALPHA_JIT_LOG=recompile` says why a retrace happened.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import AlphaJitError, TraceError
from alpha_jit.ir import trace
from alpha_jit.ir.graph import Graph
from alpha_jit.ir.passes.manager import run_passes
from alpha_jit.tensor import StateTensor, Tensor, as_tensor

log = logging.getLogger("alpha_jit.compile")
PRECISIONS = ("f32", "f16", "bf16")
_BUILD_HOOK: Callable[[Any, Any], None] | None = None


def set_build_hook(hook: Callable[[Any, Any], None] | None) -> None:
    """Called with (traced, executable) after each step is built (`alpha-jit dump-ir`)."""
    global _BUILD_HOOK
    _BUILD_HOOK = hook


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

    def guard_holds(self) -> bool:
        """False when a kept gradient appeared or vanished since tracing: retrace."""
        return all((p._grad_holder is not None) == had for p, had in self.grad_guard)

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
                feed[n] = state_values[g.attrs(n)["key"]]
            elif op == "hparam":
                feed[n] = np.asarray(hparam_values[g.attrs(n)["key"]], g.dtype(n).np_storage)
        return feed


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
    return kind(unflatten(values[start:start + n], s) for start, n, s in structs)


def trace_step(fn: Callable, args: tuple, precision: str = "f32",
               loss_scaler: Any = None) -> TracedStep:
    """Run `fn` once with tracer tensors and return the recorded step."""
    sig = signature_of(args, precision)
    ctx = trace.TraceContext()
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
    g = ctx.graph
    g.outputs = [t.node for t in flat]
    ctx.snapshots.append(("traced step (fwd + bwd + opt)", g.copy()))
    return TracedStep(g, sig, [t.node for t in inputs], ctx.state, ctx.hparams,
                      ctx.hparam_nodes, ctx.index_bounds, structure, ctx.snapshots,
                      grad_updates=grad_updates, grad_guard=guard)


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
    """The callable `@alpha_jit.compile` returns."""

    def __init__(self, fn: Callable, precision: str = "f32", passes: list[str] | None = None,
                 loss_scale: dict | None = None):
        if precision not in PRECISIONS:
            raise AlphaJitError(f"precision {precision!r} is not supported; "
                                f"choose one of {PRECISIONS}")
        functools.update_wrapper(self, fn)
        self.fn, self.precision, self.passes = fn, precision, passes
        self.loss_scaler = None
        if precision == "f16":  # f16 gradients need dynamic loss scaling (bf16's range does not)
            from alpha_jit.nn.loss_scale import LossScaler

            self.loss_scaler = LossScaler(**(loss_scale or {}))
        self.cache: dict[tuple, list[Any]] = {}  # signature -> executables (by grad guard)
        self.traces = 0
        self.last_traced: TracedStep | None = None

    def trace(self, *args: np.ndarray) -> TracedStep:
        """Trace and run the passes, without compiling for a device (used by dump-ir, tests)."""
        traced = trace_step(self.fn, args, self.precision, self.loss_scaler)
        traced.graph, traced.pass_history = run_passes(traced.graph, self.passes)
        for p, holder in traced.grad_updates:
            p._grad_holder = holder
        self.traces += 1
        self.last_traced = traced
        return traced

    def __call__(self, *args: Any) -> Any:
        # np.array(order="C") keeps 0-d arrays 0-d (ascontiguousarray would make them (1,))
        args = tuple(np.array(a, order="C", copy=not a.flags.c_contiguous)
                     if isinstance(a, np.ndarray) else a for a in args)
        sig = signature_of(args, self.precision)
        exe = next((e for e in self.cache.get(sig, []) if e.traced.guard_holds()), None)
        if exe is None:
            if self.cache and "recompile" in os.environ.get("ALPHA_JIT_LOG", ""):
                why = _why(self.cache, sig) if sig not in self.cache else \
                    "a parameter's kept .grad appeared or was cleared"
                print(f"[alpha_jit] retracing {self.fn.__name__}: {why}", file=sys.stderr)
            from alpha_jit.runtime.step import Executable

            exe = Executable(self.trace(*args))
            self.cache.setdefault(sig, []).append(exe)
            if _BUILD_HOOK is not None:
                _BUILD_HOOK(exe.traced, exe)
        return unflatten(exe(list(args)), exe.traced.out_structure)


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
            passes: list[str] | None = None, loss_scale: dict | None = None) -> Any:
    """Decorator: `@alpha_jit.compile` or `@alpha_jit.compile(precision="bf16")`.

    precision: "f32", "bf16" (GEMM inputs in bf16, f32 accumulation and master weights) or
    "f16" (the same in f16, plus dynamic loss scaling; `loss_scale` takes LossScaler options,
    e.g. {"init_scale": 2.0**16, "growth_interval": 2000})."""
    if fn is None:
        return lambda f: CompiledFunction(f, precision, passes, loss_scale)
    return CompiledFunction(fn, precision, passes, loss_scale)


__all__ = ["compile", "CompiledFunction", "TracedStep", "trace_step", "TraceError"]
