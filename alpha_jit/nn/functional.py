"""Neural-network functions built from IR ops: activations, log-softmax, cross-entropy.

Each is a few tensor ops (no special kernels): fusion turns them into a handful of kernels, and
autodiff differentiates them through the ops' VJP rules.
"""

from __future__ import annotations

from typing import Any

from alpha_jit import dtypes
from alpha_jit.errors import DTypeError, ShapeError
from alpha_jit.ir import trace
from alpha_jit.tensor import Tensor, as_tensor, iota


def relu(x: Any) -> Tensor:
    return trace.apply("relu", [x])


def gelu(x: Any) -> Tensor:
    """GELU, tanh approximation (GPT-2's)."""
    return trace.apply("gelu", [x])


def sigmoid(x: Any) -> Tensor:
    x = as_tensor(x)
    return 1.0 / (1.0 + (-x).exp())


def silu(x: Any) -> Tensor:
    x = as_tensor(x)
    return x * sigmoid(x)


def dropout(x: Any, p: float) -> Tensor:
    """Inverted dropout with a counter-based mask (see `alpha_jit.nn.random`); p=0 is identity."""
    x = as_tensor(x)
    if p <= 0.0:
        return x
    from alpha_jit.nn.random import uniform

    keep = uniform(x.shape) >= p
    return x * keep * (1.0 / (1.0 - p))


def linear(x: Any, weight: Any, bias: Any = None) -> Tensor:
    """x @ weight.T + bias, weight stored [out, in] as in PyTorch.

    Under bf16/f16 autocast the result is in the low dtype, as PyTorch's autocast linear:
    f32 accumulation, the bias added to the f32 sum, one rounding (all in the GEMM's store).
    Activations saved for the backward (the GELU input, the logits) then take half the
    memory; whatever mixes them with f32 values (residual adds, norms, losses) computes in
    f32."""
    x, w = as_tensor(x), as_tensor(weight)
    if x.ndim > 2:
        y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])
    else:
        y = x @ w.T
    y = y + bias if bias is not None else y
    low = trace.current().autocast
    return y.astype(low) if low is not None and y.dtype != low else y


def log_softmax(x: Any, axis: int = -1) -> Tensor:
    x = as_tensor(x)
    return x - x.logsumexp(axis=axis, keepdims=True)


def softmax(x: Any, axis: int = -1) -> Tensor:
    return log_softmax(x, axis).exp()


def one_hot(labels: Any, num_classes: int) -> Tensor:
    """f32 [..., num_classes] with 1.0 at each label."""
    y = as_tensor(labels)
    shape = (*y.shape, num_classes)
    y_b = y.reshape(*y.shape, 1).broadcast_to(shape)
    return y_b.eq(iota(shape, len(shape) - 1))


def cross_entropy(logits: Any, labels: Any, ignore_index: int | None = None) -> Tensor:
    """Mean negative log-likelihood of integer `labels` [N] under `logits` [N, C], computed
    stably through log-softmax. Labels equal to `ignore_index` count for nothing (the mean is
    over the others)."""
    z, y = as_tensor(logits), as_tensor(labels)
    ctx = trace.current()
    where = ctx.provenance().where()
    if y.dtype != dtypes.int32:
        raise DTypeError("cross_entropy", f"labels must be integer class indices, got "
                         f"{y.dtype}{list(y.shape)} (logits {z.dtype}{list(z.shape)})", where)
    if z.ndim != 2 or y.shape != z.shape[:1]:
        raise ShapeError("cross_entropy", f"expects logits [N, C] and labels [N], got logits "
                         f"{z.shape} and labels {y.shape}", where)
    note_index_bound(y, z.shape[1], "cross_entropy", also=ignore_index)
    # one fused kernel: per row (lse - z[y], lse) in f32, no one-hot; the backward forms
    # softmax - onehot on the fly from the saved lse (ir/ops/rowwise.py)
    rows = trace.apply("cross_entropy_rows", [z, y], {"ignore_index": ignore_index})[:, 0]
    if ignore_index is None:
        loss = rows.mean()
    else:
        keep = y.ne(ignore_index)  # an ignored row's loss is 0 already
        from alpha_jit.tensor import maximum

        loss = rows.sum() / maximum(keep.sum(), 1.0)
    # under autocast the loss is f32 whatever the logits' dtype (PyTorch's autocast runs
    # cross_entropy in f32): a bf16/f16 loss would round it, and an f16 one overflows the
    # loss scale
    return loss if ctx.autocast is not None else loss.astype(z.dtype)


def embedding(ids: Any, table: Any) -> Tensor:
    t, i = as_tensor(table), as_tensor(ids)
    note_index_bound(i, t.shape[0], "embedding")
    return trace.apply("gather_rows", [t, i])


def note_index_bound(ids: Tensor, high: int, op: str, also: int | None = None) -> None:
    """Ids that come straight from a step argument are range-checked on every call, before
    any GPU work: an out-of-range id would otherwise read or drop memory silently. `also`
    is one more allowed value (an ignore_index)."""
    ctx = trace.current()
    g = ctx.graph
    node = ids.node
    while g.op(node) in ("reshape",):
        node = g.args(node)[0]
    if g.op(node) == "input":
        idx = g.attrs(node)["index"]
        lo, hi = 0, high
        if idx in ctx.index_bounds:
            hi = min(hi, ctx.index_bounds[idx][1])
            also = also if also == ctx.index_bounds[idx][4] else None
        ctx.index_bounds[idx] = (lo, hi, op, ctx.provenance().where(), also)


def scaled_dot_product_attention(q: Any, k: Any, v: Any, is_causal: bool = False,
                                 scale: float | None = None, dropout_p: float = 0.0) -> Tensor:
    """softmax(q @ k^T * scale [causal mask]) @ v as one fused `attention` op (flash kernels
    forward and backward, no [T, T] tensor). q [B, H, T, hd], k and v [B, Hkv, T, hd] with H a
    multiple of Hkv (grouped-query attention). Under `precision="bf16"|"f16"` q, k, v are read
    in the low type and the result is f32, like a GEMM. `scale` defaults to 1/sqrt(hd)."""
    import math

    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1), got "
                         f"{dropout_p}")
    ctx = trace.current()
    attrs: dict = {"causal": bool(is_causal), "scale": scale}
    if ctx.autocast is not None:  # the precision policy, as for GEMMs: low operands, f32 out
        q, k, v = (t.astype(ctx.autocast) if t.dtype != ctx.autocast else t for t in (q, k, v))
        attrs["out_dtype"] = "f32"
    extra = []
    if dropout_p > 0.0:  # the kernels draw the mask nn.functional.dropout would draw unfused
        from alpha_jit.nn.random import counter, default_generator, next_salt

        attrs.update(dropout=float(dropout_p), seed=default_generator.seed, salt=next_salt())
        extra = [counter()]
    return trace.apply("attention", [q, k, v, *extra], attrs)


def _attention_unfused(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                       dropout_p: float) -> Tensor:
    from alpha_jit.tensor import where

    if q.ndim == 4 and k.ndim == 4 and k.shape[1] != q.shape[1] and k.shape[1] \
            and q.shape[1] % k.shape[1] == 0:  # GQA: each kv head serves H / Hkv query heads
        b, hkv, t, hd = k.shape
        rep = q.shape[1] // hkv
        k, v = (z.reshape(b, hkv, 1, t, hd).broadcast_to((b, hkv, rep, t, hd))
                .reshape(b, hkv * rep, t, hd) for z in (k, v))
    att = (q @ k.swap_last()) * scale
    if causal:
        t, s = att.shape[-2], att.shape[-1]
        att = where(iota((t, s), 0) >= iota((t, s), 1), att, float("-inf"))
    return dropout(softmax(att, axis=-1), dropout_p) @ v
