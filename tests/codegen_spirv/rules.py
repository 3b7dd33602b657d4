"""A stand-in for the IR op registry's scalar rules: op name -> emitter calls."""

from __future__ import annotations

from alpha_jit.codegen_spirv.scalar import BINARY_OPS, COMPARE_OPS, UNARY_OPS


def scalar_rule(op, e, attrs, args):
    if op in BINARY_OPS:
        return e.binary(op, *args)
    if op in UNARY_OPS:
        return e.unary(op, *args)
    if op in COMPARE_OPS:
        return e.compare(op, *args)
    if op == "select":
        return e.select(*args)
    if op == "cast":
        return e.cast(args[0], attrs["dtype"])
    raise KeyError(op)
