"""Counter-based random numbers: a pure function of (seed, call counter, site, element index).

Dropout needs masks that a replayed command buffer, a fused kernel and the numpy reference all
draw identically, with no RNG state on the device. `rand_uniform(counter, lin)` hashes the
element's linear index with the per-call counter and a per-site salt (two rounds of the
`lowbias32` integer hash, all in wrapping u32 arithmetic) and maps the top 24 bits to [0, 1).
"""

from __future__ import annotations

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import DTypeError
from alpha_jit.ir.ops.registry import OpDef, register

_M1, _M2 = 0x7FEB352D, 0x846CA68B
_K_LIN, _K_CTR, _K_SALT = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _infer(shapes, dts, attrs):
    if dts[0] != dtypes.int32 or dts[1] != dtypes.int32 or shapes[0] != ():
        raise DTypeError("rand_uniform", f"needs an i32 scalar counter and i32 indices, got "
                         f"{dts[0]}{list(shapes[0])} and {dts[1]}{list(shapes[1])}")
    return shapes[1], dtypes.float32


def _ref(a, attrs):
    with np.errstate(over="ignore"):
        ctr = np.asarray(a[0]).astype(np.uint32)
        lin = np.asarray(a[1]).astype(np.uint32)
        x = (lin * np.uint32(_K_LIN)) ^ (ctr * np.uint32(_K_CTR)) ^ np.uint32(
            (attrs["salt"] * _K_SALT + attrs["seed"]) & 0xFFFFFFFF)
        for _ in range(2):
            x = x ^ (x >> np.uint32(16))
            x = x * np.uint32(_M1)
            x = x ^ (x >> np.uint32(15))
            x = x * np.uint32(_M2)
            x = x ^ (x >> np.uint32(16))
        return ((x >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24))


def _scalar(e, attrs, ctr, lin):
    u = lambda v: e.const(v, "u32")  # noqa: E731
    mul, xor, shr = (lambda a, b: e.binary("mul", a, b)), (lambda a, b: e.binary("xor", a, b)), \
        (lambda a, b: e.binary("shr", a, b))
    salt = (attrs["salt"] * _K_SALT + attrs["seed"]) & 0xFFFFFFFF
    x = xor(xor(mul(e.cast(lin, "u32"), u(_K_LIN)), mul(e.cast(ctr, "u32"), u(_K_CTR))),
            u(salt))
    for _ in range(2):
        x = mul(xor(x, shr(x, u(16))), u(_M1))
        x = mul(xor(x, shr(x, u(15))), u(_M2))
        x = xor(x, shr(x, u(16)))
    return e.binary("mul", e.cast(shr(x, u(8)), "f32"), e.const(2.0 ** -24, "f32"))


register(OpDef("rand_uniform", "elementwise", _infer, _ref,
               lambda g, args, out, attrs: [None, None], _scalar, nondiff_args=(0, 1)))
