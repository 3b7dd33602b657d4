"""Fused row ops: LayerNorm / RMSNorm over the last axis and the cross-entropy over classes.

Why: composed from primitives, a LayerNorm is 5 kernels forward and 11 backward, and the
cross-entropy builds an f32 one-hot [N, C] that the backward keeps alive (1.6 GB at gpt2
shape). Each op here is one kernel per direction (`codegen_spirv/kernels/rowwise.py`,
`rowwise_regs.py` where a row fits a subgroup's registers, `cross_entropy.py`):

- `layer_norm(x, w[, b])`, `rms_norm(x, w)` (attrs `eps`): f32 math whatever x's storage.
  The VJP recomputes per-row statistics (`norm_stats` -> [..., 2]: mean (0 for RMS), rstd)
  rather than keeping them from the forward (a node has one output), then `norm_dx` (one
  kernel for dx) and `norm_dwb` (dw and db as one column reduction -> [1 or 2, D] f32).
- `cross_entropy_rows(z [N, C], y [N] i32)` (attr `ignore_index`, int or None) -> [N, 2]
  f32: column 0 the loss lse - z[y] (0 where y == ignore_index, NaN for a label outside
  [0, C): never a quietly wrong loss), column 1 the row's logsumexp, which the backward
  (`cross_entropy_rows_grad`) reads to form softmax(z) - onehot(y) on the fly, with no
  one-hot anywhere. A zero cotangent of the lse column contributes nothing (also where
  softmax is NaN), as PyTorch treats ignored rows.
"""

from __future__ import annotations

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import DTypeError, ShapeError
from alpha_jit.ir.ops.registry import OpDef, register
from alpha_jit.ir.ops.rules import require_float

F32 = dtypes.float32


# ---- norms ---------------------------------------------------------------------------------
def _norm_infer(name: str):
    def infer(shapes, dts, attrs):
        x = shapes[0]
        if len(x) < 1 or x[-1] < 1:
            raise ShapeError(name, f"needs an input with a non-empty last axis, got {x}")
        want = 3 if name == "layer_norm" else 2
        if len(shapes) not in (2, want):
            raise ShapeError(name, f"takes x, weight{', bias' if want == 3 else ''}; got "
                             f"{len(shapes)} operands")
        for s in shapes[1:]:
            if tuple(s) != (x[-1],):
                raise ShapeError(name, f"weight/bias must have shape ({x[-1]},) for input "
                                 f"{x}, got {s}")
        require_float(name, shapes, dts)
        # out_dtype: set by the cast_fold pass when the only use is a low-precision cast
        return tuple(x), dtypes.dtype(attrs["out_dtype"]) if "out_dtype" in attrs else dts[0]

    return infer


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1])


def _stats_ref(x: np.ndarray, eps: float, rms: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (mean, rstd) with keepdims, as the kernels compute them (two passes)."""
    with np.errstate(all="ignore"):
        if rms:
            mean = np.zeros_like(x[..., :1])
            var = np.mean(x * x, axis=-1, keepdims=True)
        else:
            mean = np.mean(x, axis=-1, keepdims=True)
            var = np.mean((x - mean) * (x - mean), axis=-1, keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
    return mean, rstd


def _norm_ref(rms: bool):
    def ref(a, attrs):
        x = a[0]
        mean, rstd = _stats_ref(x, attrs["eps"], rms)
        with np.errstate(all="ignore"):
            y = (x - mean) * rstd * a[1]
            return y + a[2] if len(a) > 2 else y

    return ref


def _norm_vjp(rms: bool):
    def vjp(g, args, out, attrs):
        from alpha_jit.ir import trace

        x, w = args[0], args[1]
        stats = trace.apply("norm_stats", [x], {"eps": attrs["eps"], "rms": rms})
        dx = trace.apply("norm_dx", [x, w, g, stats], {"rms": rms})
        bias = len(args) > 2
        dwb = trace.apply("norm_dwb", [x, g, stats], {"rms": rms, "bias": bias})
        grads = [dx, dwb[0].astype(w.dtype)]
        if bias:
            grads.append(dwb[1].astype(args[2].dtype))
        return grads

    return vjp


def _stats_infer(shapes, dts, attrs):
    require_float("norm_stats", shapes, dts)
    return (*shapes[0][:-1], 2), F32


def _stats_ref_op(a, attrs):
    mean, rstd = _stats_ref(a[0], attrs["eps"], attrs["rms"])
    return np.concatenate([mean, rstd], axis=-1)


def _dx_infer(shapes, dts, attrs):
    x, w, g, st = shapes
    if tuple(g) != tuple(x) or tuple(w) != (x[-1],) or tuple(st) != (*x[:-1], 2) \
            or dts[3] != F32:
        raise ShapeError("norm_dx", f"needs x, w [D], g like x, stats [..., 2]; got "
                         f"{x}, {w}, {g}, {st}")
    return tuple(x), dts[0]


def _xhat(x: np.ndarray, st: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return (x - st[..., :1]) * st[..., 1:]


def _dx_ref(a, attrs):
    x, w, g, st = a
    xh = _xhat(x, st)
    with np.errstate(all="ignore"):
        dxh = g * w
        inner = dxh - xh * np.mean(dxh * xh, axis=-1, keepdims=True)
        if not attrs["rms"]:
            inner = inner - np.mean(dxh, axis=-1, keepdims=True)
        return st[..., 1:] * inner


def _dwb_infer(shapes, dts, attrs):
    x, g, st = shapes
    if tuple(g) != tuple(x) or tuple(st) != (*x[:-1], 2) or dts[2] != F32:
        raise ShapeError("norm_dwb", f"needs x, g like x, stats [..., 2]; got {x}, {g}, {st}")
    return (2 if attrs["bias"] else 1, x[-1]), F32


def _dwb_ref(a, attrs):
    x, g, st = a
    with np.errstate(all="ignore"):
        dw = np.sum(_rows(g * _xhat(x, st)), axis=0)
        return np.stack([dw, np.sum(_rows(g), axis=0)] if attrs["bias"] else [dw])


register(OpDef("layer_norm", "kernel", _norm_infer("layer_norm"), _norm_ref(False),
               _norm_vjp(False)))
register(OpDef("rms_norm", "kernel", _norm_infer("rms_norm"), _norm_ref(True),
               _norm_vjp(True)))
register(OpDef("norm_stats", "kernel", _stats_infer, _stats_ref_op))
register(OpDef("norm_dx", "kernel", _dx_infer, _dx_ref))
register(OpDef("norm_dwb", "kernel", _dwb_infer, _dwb_ref))


# ---- cross-entropy -------------------------------------------------------------------------
def _ce_check(name: str, shapes, dts) -> None:
    z, y = shapes[0], shapes[1]
    if len(z) != 2 or tuple(y) != (z[0],) or z[1] < 1:
        raise ShapeError(name, f"expects logits [N, C] and labels [N], got logits {z} and "
                         f"labels {y}")
    if dts[1] != dtypes.int32:
        raise DTypeError(name, f"labels must be integer class indices (i32), got "
                         f"{dts[1]}{list(y)}")
    require_float(name, [z], [dts[0]])


def _ce_infer(shapes, dts, attrs):
    _ce_check("cross_entropy_rows", shapes, dts)
    return (shapes[0][0], 2), F32


def _ce_grad_infer(shapes, dts, attrs):
    _ce_check("cross_entropy_rows_grad", shapes, dts)
    n = shapes[0][0]
    if tuple(shapes[2]) != (n, 2) or tuple(shapes[3]) != (n, 2) or dts[2] != F32 \
            or dts[3] != F32:
        raise ShapeError("cross_entropy_rows_grad", f"needs rows and cotangent [{n}, 2], got "
                         f"{dts[2]}{list(shapes[2])} and {dts[3]}{list(shapes[3])}")
    return tuple(shapes[0]), dts[0]


def lse_rows(z: np.ndarray) -> np.ndarray:
    """Row logsumexp [N], shifting by the max (by 0 where the max is infinite, as kernels do)."""
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isinf(m), np.zeros_like(m), m)
    with np.errstate(all="ignore"):
        return (np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True)) + m)[:, 0]


def _label_masks(y: np.ndarray, c: int, ignore: int | None) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(y.shape, bool) if ignore is None else y != ignore
    valid = (y >= 0) & (y < c)
    return keep, valid


def _ce_ref(a, attrs):
    z, y = a
    lse = lse_rows(z)
    keep, valid = _label_masks(y, z.shape[1], attrs["ignore_index"])
    picked = z[np.arange(z.shape[0]), np.clip(y, 0, z.shape[1] - 1)]
    with np.errstate(all="ignore"):
        loss = np.where(keep, np.where(valid, lse - picked, np.nan), 0.0)
    return np.stack([loss, lse], axis=-1).astype(z.dtype)


def _ce_grad_ref(a, attrs):
    z, y, r, g = a
    keep, valid = _label_masks(y, z.shape[1], attrs["ignore_index"])
    with np.errstate(all="ignore"):
        p = np.exp(z - r[:, 1:])
        coef = np.where(keep, np.where(valid, g[:, 0], np.nan), 0.0)[:, None]
        g1 = g[:, 1:]
        # an ignored row contributes nothing, even where its softmax is NaN
        out = np.where(keep[:, None], p * coef, 0.0) + np.where(g1 == 0, 0.0, p * g1)
        hit = np.arange(z.shape[1])[None, :] == y[:, None]
        return out - np.where(hit, coef, 0.0)


def _ce_vjp(g, args, out, attrs):
    from alpha_jit.ir import trace

    z, y = args
    return [trace.apply("cross_entropy_rows_grad", [z, y, out, g], dict(attrs)), None]


register(OpDef("cross_entropy_rows", "kernel", _ce_infer, _ce_ref, _ce_vjp, nondiff_args=(1,)))
register(OpDef("cross_entropy_rows_grad", "kernel", _ce_grad_infer, _ce_grad_ref,
               nondiff_args=(1, 2, 3)))
