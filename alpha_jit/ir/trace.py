"""Tracing: running the user's step with tracer tensors to record a Graph.

A `TraceContext` is active while a compiled function runs for the first time (or for a new input
signature). Every op call goes through `apply`, which checks shapes and dtypes with the op's rule,
captures provenance (the user's file:line, the module path, the phase) and adds a node. State
(parameters, optimizer moments, gradients kept across steps) is read once per trace and written
back at the end; host-fed runtime scalars (the learning rate) become `hparam` inputs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from alpha_jit.dtypes import DType
from alpha_jit.errors import TraceError
from alpha_jit.ir.graph import Graph, Provenance
from alpha_jit.ir.host_gc import gc_paused
from alpha_jit.ir.ops import registry

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STACK: list[TraceContext] = []


_MODEL_DIR = os.path.join(_PKG_DIR, "nn") + os.sep  # alpha_jit's own models and layers


# absolute code file name -> itself normalized, or None inside alpha_jit: every traced op walks
# the stack, and abspath per frame was a fifth of the trace time (a relative name depends on
# the working directory: never cached)
_USER_FILE: dict[str, str | None] = {}


def user_frame() -> tuple[str, int, str]:
    """The innermost stack frame outside the alpha_jit package: the user's line."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        fn = _USER_FILE.get(name, "")
        if fn == "":
            fn = os.path.abspath(name)
            fn = None if fn.startswith(_PKG_DIR + os.sep) else fn
            if os.path.isabs(name):
                _USER_FILE[name] = fn
        if fn is not None:
            return fn, f.f_lineno, f.f_code.co_name
        f = f.f_back
    return "?", 0, "?"


def model_line() -> str:
    """"file.py:line" of the innermost frame in alpha_jit's model code (`alpha_jit/nn`), or "":
    for alpha_jit's own GPT the user's line is only the call of the step, so profiles and dumps
    also name the layer's line (e.g. transformer.py:118, the attention scores)."""
    f = sys._getframe(1)
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(_MODEL_DIR):
            return f"{os.path.basename(fn)}:{f.f_lineno}"
        if not fn.startswith(_PKG_DIR + os.sep):
            return ""
        f = f.f_back
    return ""


@dataclass
class HParam:
    """A host-computed scalar fed to the step on every call (e.g. the learning rate)."""

    key: tuple
    provider: Any  # object with next_hparams() -> dict[name, float], called once per step
    name: str


@dataclass
class TraceContext:
    graph: Graph = field(default_factory=Graph)
    phase: str = "fwd"
    module_stack: list[str] = field(default_factory=list)
    # state key -> the holder object (Parameter, optimizer moment, grad buffer)
    state: dict[int, Any] = field(default_factory=dict)
    # state key -> node id of its current value inside this trace
    state_value: dict[int, int] = field(default_factory=dict)
    # parameter state key -> traced gradient Tensor (p.grad inside the trace)
    grads: dict[int, Any] = field(default_factory=dict)
    grad_params: dict[int, Any] = field(default_factory=dict)
    hparams: dict[tuple, HParam] = field(default_factory=dict)
    hparam_nodes: dict[tuple, int] = field(default_factory=dict)
    # input index -> (low, high, op, where, also-allowed): range checks on index inputs
    index_bounds: dict[int, tuple[int, int, str, str, int | None]] = field(
        default_factory=dict)
    snapshots: list[tuple[str, Graph]] = field(default_factory=list)
    prov_override: Provenance | None = None
    created_by: str = "trace"
    # precision policy: GEMM inputs in this dtype (f16/bf16), None for plain f32
    autocast: DType | None = None
    loss_scaler: Any = None  # f16: alpha_jit.nn.loss_scale.LossScaler
    grad_ok: Any = None  # f32 mask: 1 when every gradient of this step is finite
    passes: frozenset[str] | None = None  # compile(passes=...): None runs every pass
    grads_taken: int = 0  # backward() calls so far (forward rewrites run before the first)
    # (object, attribute, value read while tracing): Python state the graph depends on, such as
    # a module's `training` flag; a call where one differs retraces (`TracedStep.guard_holds`)
    guards: list[tuple[Any, str, Any]] = field(default_factory=list)
    # (id of a captured numpy array, dtype) -> (the array, its constant StateTensor)
    constants: dict[tuple[int, str], tuple[Any, Any]] = field(default_factory=dict)

    # (id(object), attribute) the traced function set itself (model.eval() inside a step)
    assigned: set[tuple[int, str]] = field(default_factory=set)

    def guard(self, obj: Any, attr: str) -> Any:
        """Read `obj.attr` and make the trace depend on it: later calls retrace when it
        changes (model.train()/eval(), requires_grad_). Not when the function set it."""
        value = getattr(obj, attr)
        if (id(obj), attr) not in self.assigned and \
                not any(o is obj and a == attr for o, a, _ in self.guards):
            self.guards.append((obj, attr, value))
        return value

    def assign_guarded(self, obj: Any, attr: str) -> None:
        """The traced function sets `obj.attr`: reads after this do not guard."""
        self.assigned.add((id(obj), attr))

    def pass_enabled(self, name: str) -> bool:
        """A pass runs unless `passes=` leaves it out or ALPHA_JIT_DISABLE_PASSES names it."""
        from alpha_jit.ir.passes.manager import disabled_passes

        return name not in disabled_passes() and (self.passes is None or name in self.passes)

    # ---- provenance ---------------------------------------------------------------------------
    def provenance(self) -> Provenance:
        if self.prov_override is not None:
            return self.prov_override.with_(phase=self.phase, created_by=self.created_by)
        file, line, func = user_frame()
        return Provenance(file, line, func, ".".join(self.module_stack), self.phase,
                          self.created_by, model_line())

    @contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    @contextmanager
    def in_module(self, name: str) -> Iterator[None]:
        self.module_stack.append(name)
        try:
            yield
        finally:
            self.module_stack.pop()

    # ---- state --------------------------------------------------------------------------------
    def read_state(self, holder: Any) -> int:
        key = holder.state_key
        if key not in self.state_value:
            self.state[key] = holder
            node = self.graph.add("state", [], {"key": key, "name": holder.state_name},
                                  holder.shape, holder.dtype, self.provenance())
            self.state_value[key] = node
        return self.state_value[key]

    def write_state(self, holder: Any, node: int) -> None:
        g = self.graph
        if g.shape(node) != tuple(holder.shape) or g.dtype(node) != holder.dtype:
            raise TraceError("state write", f"{holder.state_name} is {holder.dtype}"
                             f"{list(holder.shape)} but the new value is {g.dtype(node)}"
                             f"{list(g.shape(node))}", self.provenance().where())
        self.state[holder.state_key] = holder
        self.state_value[holder.state_key] = node
        g.state_writes[holder.state_key] = node

    def hparam(self, provider: Any, name: str, dtype: DType) -> int:
        key = (id(provider), name)
        if key not in self.hparam_nodes:
            self.hparams[key] = HParam(key, provider, name)
            self.hparam_nodes[key] = self.graph.add(
                "hparam", [], {"key": key, "name": name}, (), dtype, self.provenance())
        return self.hparam_nodes[key]


def current() -> TraceContext:
    if not _STACK:
        raise TraceError("trace", "alpha_jit tensor ops run only inside a function decorated "
                         "with @alpha_jit.compile; wrap the call (`@aj.compile\ndef f(x): "
                         "return model(x)`) and pass numpy arrays as its arguments",
                         user_where())
    return _STACK[-1]


def active() -> TraceContext | None:
    return _STACK[-1] if _STACK else None


def user_where() -> str:
    file, line, func = user_frame()
    return f"{file}:{line} in {func}"


@contextmanager
def tracing(ctx: TraceContext) -> Iterator[TraceContext]:
    _STACK.append(ctx)
    try:
        with gc_paused():  # a trace keeps nearly all it allocates: collections find nothing
            yield ctx
    finally:
        _STACK.pop()


def apply(op: str, args: list[Any], attrs: dict | None = None) -> Any:
    """Record one op: check it with the registry's rule, add the node, return a Tensor."""
    from alpha_jit.tensor import Tensor, as_tensor

    ctx = current()
    opdef = registry.get(op)
    attrs = attrs or {}
    targs = _autocast(ctx, opdef, [as_tensor(a) for a in args])
    if ctx.autocast is not None and opdef.lowering == "matmul" and "out_dtype" not in attrs:
        # a low-precision GEMM still returns its f32 accumulator: logits, scores and every
        # norm, softmax and loss downstream compute on f32 values (PyTorch autocast rounds
        # GEMM outputs to bf16; this is at least as accurate)
        attrs = {**attrs, "out_dtype": "f32"}
    try:
        shape, dtype = opdef.infer([t.shape for t in targs], [t.dtype for t in targs], attrs)
    except TraceError as e:
        if e.where is None:
            raise type(e)(e.op, str(e).split(": ", 1)[1], ctx.provenance().where()) from None
        raise
    node = ctx.graph.add(op, [t.node for t in targs], attrs, shape, dtype, ctx.provenance())
    return Tensor(node, tuple(shape), dtype)


AUTOCAST = "autocast"  # provenance `created_by` of the casts the precision policy inserts


def _autocast(ctx: TraceContext, opdef: Any, targs: list[Any]) -> list[Any]:
    """The precision policy. GEMMs read their operands in the low-precision dtype (f32
    accumulation happens in the kernel) and return f32; elementwise ops mixing float dtypes
    compute in the widest, so norms, softmax, losses and the optimizer run in f32."""
    from alpha_jit import dtypes

    low = ctx.autocast
    if low is not None and opdef.lowering == "matmul":
        made_by, ctx.created_by = ctx.created_by, AUTOCAST  # passes may rely on the policy's
        try:                                                # casts (cast_fold, rewrite 3)
            return [t.astype(low) if t.dtype.is_float and t.dtype != low else t for t in targs]
        finally:
            ctx.created_by = made_by
    if opdef.lowering == "elementwise" and opdef.name != "cast":
        # where's condition is any dtype; the values promote like any other operands
        first = 1 if opdef.name == "where" else 0
        vals = targs[first:]
        floats = {t.dtype for t in vals if t.dtype.is_float}
        if len(floats) > 1:
            # f32 with anything, and bf16 with f16 (neither holds the other), meet in f32
            wide = dtypes.float16 if floats == {dtypes.float16} else dtypes.float32
        elif floats and len(floats) < len({t.dtype for t in vals}):
            wide = floats.pop()  # PyTorch's promotion: integer and float meet in the float
        else:
            return targs
        return targs[:first] + [t.astype(wide) if t.dtype != wide else t for t in vals]
    return targs


def leaf(op: str, attrs: dict, shape: tuple, dtype: DType) -> Any:
    from alpha_jit.tensor import Tensor

    ctx = current()
    return Tensor(ctx.graph.add(op, [], attrs, shape, dtype, ctx.provenance()), tuple(shape),
                  dtype)


def snapshot(title: str) -> None:
    """Keep a copy of the graph as it is now, for `dump-ir`."""
    ctx = current()
    ctx.snapshots.append((title, ctx.graph.copy()))


Hook = Callable[[TraceContext], None]
