"""The op registry: every op is defined once, with all of its rules side by side.

An `OpDef` carries the shape/dtype rule, the numpy reference, the VJP rule and the lowering class
(plus, for elementwise ops, the scalar rule that kernel generators call). Tracing, autodiff, the
reference interpreter and lowering all look ops up here; nothing else switches on op names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from alpha_jit.dtypes import DType

# lowering classes: how lower.py turns a node into kernels ("kernel": the op has its own kernel
# family and registers its lowering with `codegen_spirv.lower.register_kernel_lowering`)
LOWERINGS = ("input", "constant", "elementwise", "view", "reduction", "matmul", "gather",
             "scatter", "kernel")


@dataclass(frozen=True)
class OpDef:
    name: str
    lowering: str
    # (arg shapes, arg dtypes, attrs) -> (out shape, out dtype); raises ShapeError/DTypeError
    infer: Callable[[list[tuple], list[DType], dict], tuple[tuple, DType]]
    # (numpy args, attrs) -> numpy result
    ref: Callable[[list[np.ndarray], dict], np.ndarray] | None
    # (cotangent, arg Tensors, out Tensor, attrs) -> one cotangent (or None) per arg
    vjp: Callable[..., list[Any]] | None = None
    # elementwise only: (emitter, attrs, *scalar args) -> scalar value
    scalar: Callable[..., Any] | None = None
    # args that never receive gradients (indices, labels)
    nondiff_args: tuple[int, ...] = ()


_OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    assert op.lowering in LOWERINGS, op.lowering
    assert op.name not in _OPS, f"op {op.name} registered twice"
    _OPS[op.name] = op
    return op


def get(name: str) -> OpDef:
    _ensure_loaded()
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no op named {name!r} is registered") from None


def all_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(_OPS)


def scalar_rule(op: str, emitter: Any, attrs: tuple | dict, args: list[Any]) -> Any:
    """What elementwise kernel generators call to emit one op of a fused expression."""
    opdef = get(op)
    if opdef.scalar is None:
        raise KeyError(f"op {op!r} has no scalar rule (lowering {opdef.lowering})")
    return opdef.scalar(emitter, dict(attrs), *args)


_loaded = False


def _ensure_loaded() -> None:
    # importing the op modules registers them; done lazily to avoid import cycles. Every module
    # of this package is an op module, so a new one needs no list to be edited. Once: listing
    # the package on every lookup was 6 s of a GPT-2 step's 13 s plan.
    global _loaded
    if _loaded:
        return
    import importlib
    import pkgutil

    from alpha_jit.ir import ops

    for info in pkgutil.iter_modules(ops.__path__):
        if info.name not in ("registry", "rules"):
            importlib.import_module(f"alpha_jit.ir.ops.{info.name}")
    _loaded = True
