"""Shape and dtype rules shared by many ops (numpy broadcasting, same-dtype checks)."""

from __future__ import annotations

from alpha_jit import dtypes
from alpha_jit.dtypes import DType
from alpha_jit.errors import DTypeError, ShapeError


def fmt(shapes: list[tuple]) -> str:
    return " and ".join(str(tuple(s)) for s in shapes)


def broadcast_shapes(op: str, shapes: list[tuple]) -> tuple:
    """numpy broadcasting; a mismatch names the op and every shape."""
    nd = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(nd):
        dims = {s[len(s) - nd + i] for s in shapes if len(s) - nd + i >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise ShapeError(op, f"shapes {fmt(shapes)} cannot be broadcast together "
                             f"(axis {i - nd}: sizes {sorted(dims)})")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def same_dtype(op: str, shapes: list[tuple], dts: list[DType]) -> DType:
    if len(set(dts)) > 1:
        desc = ", ".join(f"{d}{list(s)}" for s, d in zip(shapes, dts, strict=True))
        raise DTypeError(op, f"operands have different dtypes ({desc}); cast one with "
                         ".astype()")
    return dts[0]


def require_float(op: str, shapes: list[tuple], dts: list[DType]) -> None:
    for s, d in zip(shapes, dts, strict=True):
        if not d.is_float:
            raise DTypeError(op, f"needs a floating-point tensor, got {d}{list(s)}")


def elementwise_infer(op: str, float_only: bool = False, out_dtype: DType | None = None):
    """The shape/dtype rule of an n-ary elementwise op."""

    def infer(shapes: list[tuple], dts: list[DType], attrs: dict) -> tuple[tuple, DType]:
        dt = same_dtype(op, shapes, dts)
        if float_only:
            require_float(op, shapes, dts)
        return broadcast_shapes(op, shapes), out_dtype or dt

    return infer


F32 = dtypes.float32
I32 = dtypes.int32
