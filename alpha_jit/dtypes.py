"""Element types alpha_jit knows, and how each maps to numpy and to storage.

One table so that the tracer, the reference interpreter, the kernel generators and the
runtime agree on names, sizes and the numpy type used to move data in and out.
bf16 has no numpy type: it travels as uint16 bit patterns (the top half of an f32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    itemsize: int
    np_storage: str  # numpy dtype used for host-side bytes
    is_float: bool

    @property
    def np_storage_dtype(self) -> np.dtype:
        """`np_storage` as a numpy dtype object (made once per type: host calls compare it)."""
        return _STORAGE[self.np_storage]

    def __repr__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


float32 = DType("f32", 4, "float32", True)
float16 = DType("f16", 2, "float16", True)
bfloat16 = DType("bf16", 2, "uint16", True)
int32 = DType("i32", 4, "int32", False)

_STORAGE = {n: np.dtype(n) for n in ("float32", "float16", "uint16", "int32")}
_BY_NAME = {d.name: d for d in (float32, float16, bfloat16, int32)}
_ALIASES = {"float32": float32, "float16": float16, "bfloat16": bfloat16, "int32": int32,
            "half": float16}


def dtype(x: object) -> DType:
    """Normalise a DType, a name ('f32', 'float32') or a numpy dtype to a DType."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str):
        if x in _BY_NAME:
            return _BY_NAME[x]
        if x in _ALIASES:
            return _ALIASES[x]
        raise TypeError(f"unknown dtype {x!r}; known: {sorted(_BY_NAME)}")
    npd = np.dtype(x)  # type: ignore[call-overload]
    if npd == np.float32 or npd == np.float64:
        return float32
    if npd == np.float16:
        return float16
    if npd.kind in "iu" and npd.itemsize <= 8:
        return int32
    if npd == np.bool_:
        return int32
    raise TypeError(f"alpha_jit has no dtype for numpy {npd}")


_BY_NUMPY: dict[np.dtype, DType] = {}  # per-call input checks: a dict hit, not 5 compares


def from_numpy(arr: np.ndarray) -> DType:
    dt = _BY_NUMPY.get(arr.dtype)
    if dt is None:
        dt = _BY_NUMPY[arr.dtype] = dtype(arr.dtype)
    return dt


def to_numpy(dt: DType) -> np.dtype:
    """The numpy dtype used to hold values of `dt` in the reference interpreter: f16 and bf16
    values are held as f32 rounded to their precision (the kernels compute in f32 too)."""
    if dt in (bfloat16, float16):
        return np.dtype(np.float32)
    return np.dtype(dt.np_storage)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of f32 values, rounded to nearest even; NaN stays NaN."""
    x = np.asarray(x, dtype=np.float32)
    b = np.ascontiguousarray(x).reshape(x.shape).view(np.uint32)
    rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    return np.where(nan, np.uint32(0x7FC0), rounded).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    wide = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return np.ascontiguousarray(wide).reshape(wide.shape).view(np.float32)
