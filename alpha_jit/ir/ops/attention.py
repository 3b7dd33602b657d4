"""Fused scaled-dot-product attention: one op forward, three ops backward, never a [T, T] value.

Why: the unfused form (q @ k^T * scale -> causal mask -> softmax -> @ v) keeps several
[B, H, T, T] tensors alive from forward to backward, the largest activations of a GPT step.
`attention(q, k, v)` is one node lowered to one flash kernel (online softmax); its VJP recomputes
the scores blockwise from q, k, v, the output and the per-row log-sum-exp (`attention_lse`, which
the forward kernel writes beside the output when both nodes exist).

Shapes: q [B, H, T, hd], k and v [B, Hkv, T, hd] with H a multiple of Hkv (grouped-query
attention: query head h reads kv head h // (H // Hkv)). Attrs: `causal` (bool), `scale` (float),
optional `out_dtype` (the precision policy's f32 result for bf16/f16 operands). Gradients are f32.

Dropout (attrs `dropout` > 0, `seed`, `salt`, and a fourth argument: the RNG's i32 counter): the
probabilities are scaled by 1/(1-p) where kept and zeroed where dropped, with the mask that
`nn.functional.dropout` draws on the unfused [B, H, T, T] probabilities (`keep_scale`); the
normaliser (lse) is the undropped one. The backward ops take the counter too.

Semantics at masked positions: a masked key contributes exactly nothing (not 0 * v), so a NaN or
inf in v (or k, q) at a position that a row may not see never reaches that row; the references
below spell this out so the kernels and the interpreter agree on non-finite inputs.
"""

from __future__ import annotations

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import DTypeError, ShapeError
from alpha_jit.ir.ops.registry import OpDef, register

BWD_OPS = ("attention_bwd_dq", "attention_bwd_dk", "attention_bwd_dv")


def _check_qkv(op: str, shapes: list[tuple], dts: list) -> tuple[int, int, int, int, int]:
    q, k, v = shapes[:3]
    if len(q) != 4 or len(k) != 4 or len(v) != 4:
        raise ShapeError(op, f"needs q [B, H, T, hd] and k, v [B, Hkv, T, hd], got q {q}, "
                         f"k {k}, v {v}")
    b, h, t, hd = q
    if k != v or k[0] != b or k[2] != t or k[3] != hd:
        raise ShapeError(op, f"k and v must be [B, Hkv, T, hd] = [{b}, Hkv, {t}, {hd}] like q "
                         f"{q}, got k {k}, v {v}")
    hkv = k[1]
    if hkv < 1 or h % hkv:
        raise ShapeError(op, f"query heads {h} must be a multiple of kv heads {hkv} (q {q}, "
                         f"k {k})")
    if t < 1 or hd < 1:
        raise ShapeError(op, f"empty sequence or head dim: q {q}")
    if not all(d.is_float for d in dts[:3]) or len({dts[0], dts[1], dts[2]}) != 1:
        raise DTypeError(op, f"q, k, v must share one floating-point dtype, got "
                         f"{dts[0]}{list(q)}, {dts[1]}{list(k)}, {dts[2]}{list(v)}")
    return b, h, hkv, t, hd


def _check_dropout(op: str, shapes, dts, attrs, at: int) -> None:
    """With attrs dropout > 0 the op takes one more argument: the RNG's i32 scalar counter."""
    want = at + 1 if attrs.get("dropout", 0.0) > 0 else at
    if len(shapes) != want:
        raise ShapeError(op, f"takes {want} operands (dropout {attrs.get('dropout', 0.0)}), "
                         f"got {len(shapes)}")
    if want > at and (shapes[at] != () or dts[at] != dtypes.int32):
        raise DTypeError(op, f"the dropout counter must be an i32 scalar, got "
                         f"{dts[at]}{list(shapes[at])}")


def _fwd_infer(shapes, dts, attrs):
    _check_qkv("attention", shapes, dts)
    _check_dropout("attention", shapes, dts, attrs, 3)
    out = dtypes.dtype(attrs["out_dtype"]) if "out_dtype" in attrs else dts[0]
    return tuple(shapes[0]), out


def _lse_infer(shapes, dts, attrs):
    b, h, _, t, _ = _check_qkv("attention_lse", shapes, dts)
    return (b, h, t), dtypes.float32


def _bwd_infer(which: str):
    def infer(shapes, dts, attrs):
        op = f"attention_bwd_{which}"
        b, h, hkv, t, hd = _check_qkv(op, shapes, dts)
        _check_dropout(op, shapes, dts, attrs, 6)
        o, lse, do = shapes[3:6]
        if o != (b, h, t, hd) or do != (b, h, t, hd) or lse != (b, h, t):
            raise ShapeError(op, f"needs o and do {[b, h, t, hd]} and lse {[b, h, t]}, got o "
                             f"{o}, lse {lse}, do {do}")
        return (shapes[0] if which == "dq" else shapes[1]), dtypes.float32

    return infer


# ---- numpy references (float64 in the interpreter's gradient checks) ---------------------------
def allowed_mask(t: int, causal: bool) -> np.ndarray:
    """[T, T] bool: may query row i see key j."""
    if causal:
        return np.tril(np.ones((t, t), dtype=bool))
    return np.ones((t, t), dtype=bool)


def _masked_matmul(a: np.ndarray, b: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """sum_j a[.., i, j] * b[.., j, :] over allowed (i, j) only: a masked j adds nothing even
    where b[j] is NaN or inf (a plain matmul would add 0 * inf = NaN)."""
    if np.isfinite(b).all():
        return np.matmul(np.where(allowed, a, 0), b)
    with np.errstate(invalid="ignore", over="ignore"):
        prod = a[..., :, :, None] * b[..., None, :, :]
        return np.sum(np.where(allowed[..., None], prod, 0), axis=-2)


def _expand_kv(x: np.ndarray, h: int) -> np.ndarray:
    return np.repeat(x, h // x.shape[1], axis=1)


def _probs(q, k, attrs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p [B, H, T, T] with masked entries 0, lse [B, H, T], allowed [T, T])."""
    t = q.shape[2]
    allowed = allowed_mask(t, attrs["causal"])
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        s = np.matmul(q, np.swapaxes(_expand_kv(k, q.shape[1]), -1, -2)) * attrs["scale"]
        s = np.where(allowed, s, -np.inf)
        m = np.max(s, axis=-1, keepdims=True)
        m = np.where(np.isinf(m), np.zeros_like(m), m)  # as the logsumexp reduction shifts
        lse = np.log(np.sum(np.exp(s - m), axis=-1, keepdims=True)) + m
        p = np.where(allowed, np.exp(s - lse), 0)
    return p, lse[..., 0], allowed


def keep_scale(shape: tuple, ctr: np.ndarray | None, attrs: dict) -> np.ndarray | float:
    """Dropout on the probabilities [B, H, T, T]: 1/(1-p) where kept, 0 where dropped, drawn
    as `nn.functional.dropout` draws it on the unfused scores (rand_uniform of the element's
    linear index, with the op's seed and salt); 1.0 without dropout."""
    p = attrs.get("dropout", 0.0)
    if p <= 0:
        return 1.0
    from alpha_jit.ir.ops.random import _ref as uniform_ref

    lin = np.arange(int(np.prod(shape)), dtype=np.int64).astype(np.int32).reshape(shape)
    u = uniform_ref([np.asarray(ctr), lin], {"seed": attrs["seed"], "salt": attrs["salt"]})
    return np.where(u >= np.float32(p), np.float32(1.0 / (1.0 - p)), np.float32(0.0))


def _fwd_ref(a, attrs):
    q, k, v = a[:3]
    p, _, allowed = _probs(q, k, attrs)
    p = p * keep_scale(p.shape, a[3] if len(a) > 3 else None, attrs)
    with np.errstate(invalid="ignore", over="ignore"):
        return _masked_matmul(p, _expand_kv(v, q.shape[1]), allowed)


def _lse_ref(a, attrs):
    return _probs(a[0], a[1], attrs)[1]


def _group_sum(x: np.ndarray, hkv: int) -> np.ndarray:
    b, h, t, hd = x.shape
    return x.reshape(b, hkv, h // hkv, t, hd).sum(axis=2)


def _bwd_ref(which: str):
    def ref(a, attrs):
        q, k, v, o, lse, do = a[:6]
        h, hkv, scale = q.shape[1], k.shape[1], attrs["scale"]
        t = q.shape[2]
        allowed = allowed_mask(t, attrs["causal"])
        kk, vv = _expand_kv(k, h), _expand_kv(v, h)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            s = np.matmul(q, np.swapaxes(kk, -1, -2)) * scale
            p = np.where(allowed, np.exp(s - lse[..., None]), 0)
            keep = keep_scale(p.shape, a[6] if len(a) > 6 else None, attrs)
            at = allowed.T
            if which == "dv":
                return _group_sum(_masked_matmul(np.swapaxes(p * keep, -1, -2), do, at), hkv)
            # masked entries are dropped below; dropout scales dP as it scaled P forward
            dp = np.matmul(do, np.swapaxes(vv, -1, -2)) * keep
            dd = np.sum(do * o, axis=-1, keepdims=True)
            ds = np.where(allowed, p * (dp - dd), 0)
            if which == "dq":
                return scale * _masked_matmul(ds, kk, allowed)
            return _group_sum(scale * _masked_matmul(np.swapaxes(ds, -1, -2), q, at), hkv)

    return ref


def _plain_attrs(attrs: dict) -> dict:
    return {"causal": attrs["causal"], "scale": attrs["scale"]}


_DROPOUT_KEYS = ("dropout", "seed", "salt")


def _fwd_vjp(g, args, out, attrs):
    from alpha_jit.ir import trace

    q, k, v = args[:3]
    plain = _plain_attrs(attrs)
    lse = trace.apply("attention_lse", [q, k, v], plain)
    saved = [q, k, v, out, lse, g, *args[3:]]  # the dropout counter, if any
    bwd = {**plain, **{key: attrs[key] for key in _DROPOUT_KEYS if key in attrs}}
    return [trace.apply(op, saved, bwd) for op in BWD_OPS] + [None] * (len(args) - 3)


register(OpDef("attention", "kernel", _fwd_infer, _fwd_ref, _fwd_vjp, nondiff_args=(3,)))
# the log-sum-exp rows are saved for backward only: no gradient flows through them
register(OpDef("attention_lse", "kernel", _lse_infer, _lse_ref, None))
for _w in ("dq", "dk", "dv"):
    register(OpDef(f"attention_bwd_{_w}", "kernel", _bwd_infer(_w), _bwd_ref(_w), None))
