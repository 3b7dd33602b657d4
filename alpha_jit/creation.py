"""Tensors made inside a step: PyTorch's factories and numpy constants.

Why: ported code builds masks, positions and noise in the step (`torch.arange(T)`,
`torch.ones(T, T).tril()`, `torch.randn_like(x)`, a numpy table captured by the function).
Factories become `full` / `iota` / `rand_uniform` nodes that kernels compute in place (no
upload); a captured numpy array becomes a constant of the step: its value when the function
was traced, uploaded once and kept on the device, like a parameter without a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import DTypeError, ShapeError
from alpha_jit.ir import trace
from alpha_jit.tensor import StateTensor, Tensor, TensorOps, as_tensor, iota, where
from alpha_jit.tensor import full as _full


def _size(size: tuple) -> tuple[int, ...]:
    """`zeros(2, 3)`, `zeros((2, 3))` and `zeros([2, 3])` alike."""
    if len(size) == 1 and isinstance(size[0], tuple | list):
        size = tuple(size[0])
    return tuple(int(s) for s in size)


def _dt(dtype: Any, default: Any = dtypes.float32) -> dtypes.DType:
    return dtypes.dtype(default if dtype is None else dtype)


def _filled(shape: tuple, value: Any, dt: dtypes.DType) -> Any:
    """A `full` node inside a trace; outside, the numpy array (model constructors build
    parameters with `torch.zeros(...)`, which must port too)."""
    if trace.active() is None:
        return np.full(shape, value, dtype=dtypes.to_numpy(dt))
    return _full(shape, value, dt)


def zeros(*size: Any, dtype: Any = None, **_: Any) -> Tensor:
    """Zeros (a numpy array when called outside a compiled function, like every factory
    here: parameters are built from them in a model's constructor)."""
    return _filled(_size(size), 0, _dt(dtype))


def ones(*size: Any, dtype: Any = None, **_: Any) -> Tensor:
    return _filled(_size(size), 1, _dt(dtype))


def empty(*size: Any, dtype: Any = None, **_: Any) -> Tensor:
    """Zeros: a traced step has no uninitialised memory to hand out."""
    return zeros(*size, dtype=dtype)


def full(size: Sequence[int], fill_value: Any, dtype: Any = None, **_: Any) -> Tensor:
    """PyTorch's full: the dtype follows the fill value unless given (int -> i32)."""
    if dtype is None:
        dtype = dtypes.int32 if isinstance(fill_value, int | np.integer) and \
            not isinstance(fill_value, bool) else dtypes.float32
    return _filled(tuple(int(s) for s in size), fill_value, dtypes.dtype(dtype))


def zeros_like(x: Any, dtype: Any = None, **_: Any) -> Tensor:
    return _filled(tuple(x.shape), 0, _dt(dtype, x.dtype))


def ones_like(x: Any, dtype: Any = None, **_: Any) -> Tensor:
    return _filled(tuple(x.shape), 1, _dt(dtype, x.dtype))


def empty_like(x: Any, dtype: Any = None, **_: Any) -> Tensor:
    return zeros_like(x, dtype)


def full_like(x: Any, fill_value: Any, dtype: Any = None, **_: Any) -> Tensor:
    return _filled(tuple(x.shape), fill_value, _dt(dtype, x.dtype))


def arange(start: float, end: float | None = None, step: float = 1, *, dtype: Any = None,
           **_: Any) -> Tensor:
    """PyTorch's arange: [start, end) by step; i32 when every bound is an int, else f32."""
    if end is None:
        start, end = 0, start
    if step == 0:
        raise ShapeError("arange", "step must be nonzero", _where())
    n = max(0, math.ceil((end - start) / step))
    ints = all(isinstance(v, int | np.integer) for v in (start, end, step))
    dt = _dt(dtype, dtypes.int32 if ints else dtypes.float32)
    if trace.active() is None:
        return (np.arange(n) * step + start).astype(dtypes.to_numpy(dt))
    idx = iota((n,), 0)
    if ints and not dt.is_float:
        out = idx if (start, step) == (0, 1) else idx * int(step) + int(start)
        return out
    out = idx.astype(dtypes.float32) * float(step) + float(start)
    return out.astype(dt)


def linspace(start: float, end: float, steps: int, *, dtype: Any = None, **_: Any) -> Tensor:
    if steps < 1:
        raise ShapeError("linspace", f"steps must be at least 1, got {steps}", _where())
    if trace.active() is None:
        return np.linspace(start, end, steps).astype(dtypes.to_numpy(_dt(dtype)))
    if steps == 1:
        return _full((1,), float(start), _dt(dtype))
    out = iota((steps,), 0).astype(dtypes.float32) * ((end - start) / (steps - 1)) + start
    return out.astype(_dt(dtype))


def eye(n: int, m: int | None = None, *, dtype: Any = None, **_: Any) -> Tensor:
    m = n if m is None else m
    if trace.active() is None:
        return np.eye(n, m, dtype=dtypes.to_numpy(_dt(dtype)))
    return iota((n, m), 0).eq(iota((n, m), 1)).astype(_dt(dtype))


def band(x: Tensor, diagonal: int, lower: bool) -> Tensor:
    """tril (lower) / triu of the last two dimensions: zeros outside the band."""
    if x.ndim < 2:
        raise ShapeError("tril" if lower else "triu", f"needs at least 2 dimensions, got "
                         f"{x.shape}", _where())
    r, c = x.shape[-2:]
    i, j = iota((r, c), 0), iota((r, c), 1)
    keep = (j <= i + diagonal) if lower else (j >= i + diagonal)
    return where(keep, x, 0)


def tril(x: Any, diagonal: int = 0) -> Tensor:
    if trace.active() is None:
        return np.tril(x, diagonal)
    return band(as_tensor(x), diagonal, lower=True)


def triu(x: Any, diagonal: int = 0) -> Tensor:
    if trace.active() is None:
        return np.triu(x, diagonal)
    return band(as_tensor(x), diagonal, lower=False)


def rand(*size: Any, dtype: Any = None, **_: Any) -> Tensor:
    """Uniform [0, 1), new on every call of the step (the counter-based RNG of dropout)."""
    from alpha_jit.nn.random import uniform

    if trace.active() is None:  # parameter init: the generator nn.manual_seed seeds
        return _init_rng().random(_size(size)).astype(dtypes.to_numpy(_dt(dtype)))
    return uniform(_size(size)).astype(_dt(dtype))


def randn(*size: Any, dtype: Any = None, **_: Any) -> Tensor:
    """Standard normal by Box-Muller from two uniform draws."""
    from alpha_jit.nn.random import uniform

    shape = _size(size)
    if trace.active() is None:
        return _init_rng().standard_normal(shape).astype(dtypes.to_numpy(_dt(dtype)))
    u1, u2 = 1.0 - uniform(shape), uniform(shape)  # 1 - u is in (0, 1]: log never sees 0
    return ((u1.log() * -2.0).sqrt() * (u2 * (2 * math.pi)).cos()).astype(_dt(dtype))


def rand_like(x: Any, dtype: Any = None, **_: Any) -> Tensor:
    return rand(tuple(x.shape), dtype=_dt(dtype, x.dtype))


def randn_like(x: Any, dtype: Any = None, **_: Any) -> Tensor:
    return randn(tuple(x.shape), dtype=_dt(dtype, x.dtype))


def randint(low: int, high: int | None = None, size: Sequence[int] = (), **_: Any) -> Tensor:
    from alpha_jit.nn.random import uniform
    from alpha_jit.tensor import minimum

    if high is None:
        low, high = 0, low
    if trace.active() is None:
        return _init_rng().integers(low, high, tuple(size)).astype(np.int32)
    u = uniform(tuple(size)) * float(high - low)
    # f32 rounding can land u * n on n itself: keep the draw below `high`
    return minimum(u.floor().astype(dtypes.int32) + low, high - 1)


# ---- constants ---------------------------------------------------------------------------------
def tensor(data: Any, dtype: Any = None, **_: Any) -> Tensor:
    """PyTorch's `torch.tensor(data)`: inside a step a constant (see `constant`), outside
    the numpy array."""
    if trace.active() is None:
        return np.array(data, dtype=None if dtype is None else dtypes.to_numpy(_dt(dtype)))
    return constant(data, dtype)


def constant(data: Any, dtype: Any = None) -> Tensor:
    """A numpy array (or nested list) captured by the traced function: its value now, as a
    constant of the step. float64 becomes f32, int64 i32 (checked), bool a 1.0/0.0 mask."""
    if isinstance(data, TensorOps):
        return data._t() if dtype is None else data._t().astype(dtype)
    if isinstance(data, list | tuple) and any(isinstance(v, TensorOps) for v in data):
        from alpha_jit.tensor_shape import stack

        return stack(data)
    arr = np.asarray(data)
    mask = arr.dtype == np.bool_
    if mask:
        arr = arr.astype(np.float32)
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < -2**31 or arr.max() >= 2**31):
            raise DTypeError("constant", f"integer array with values outside int32 (alpha_jit's "
                             f"integer type): [{arr.min()}, {arr.max()}]", _where())
    elif arr.dtype.kind not in "f":
        raise DTypeError("constant", f"cannot capture a numpy {arr.dtype} array", _where())
    dt = _dt(dtype, dtypes.from_numpy(arr))
    if arr.ndim == 0 and not mask:
        return _full((), arr.item(), dt)
    ctx = trace.current()
    key = (id(data), dt.name)
    held = ctx.constants.get(key)
    if held is None or held[0] is not data:
        value = dtypes.f32_to_bf16(arr) if dt == dtypes.bfloat16 else \
            arr.astype(dt.np_storage)
        where = ctx.provenance()
        holder = StateTensor(value, f"const@{where.file.rsplit('/', 1)[-1]}:{where.line}", dt)
        holder.is_mask = mask  # a bool array: attention keeps its True positions
        held = (data, holder)  # keeps `data` alive, so its id is not reused in this trace
        ctx.constants[key] = held
    return held[1]._t()


def _init_rng() -> np.random.Generator:
    from alpha_jit.nn.layers import rng

    return rng()


def _where() -> str | None:
    return trace.current().provenance().where() if trace.active() else None


__all__ = ["zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like",
           "full_like", "arange", "linspace", "eye", "tril", "triu", "rand", "randn",
           "rand_like", "randn_like", "randint", "tensor", "constant"]
