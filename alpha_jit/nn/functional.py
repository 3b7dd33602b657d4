"""Neural-network functions built from IR ops: activations, log-softmax, cross-entropy.

Each is a few tensor ops (no special kernels): fusion turns them into a handful of kernels, and
autodiff differentiates them through the ops' VJP rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import DTypeError, ShapeError, TraceError
from alpha_jit.ir import trace
from alpha_jit.tensor import Tensor, as_tensor, full, iota, maximum, where
from alpha_jit.tensor_shape import pad as pad_zeros


def relu(x: Any, inplace: bool = False) -> Tensor:
    return trace.apply("relu", [x])


def gelu(x: Any, approximate: str = "none") -> Tensor:
    """GELU as PyTorch's: exact (erf) by default, `approximate="tanh"` for GPT-2's form."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return trace.apply("gelu", [x], {"approximate": approximate})


def sigmoid(x: Any) -> Tensor:
    return as_tensor(x).sigmoid()


def tanh(x: Any) -> Tensor:
    return as_tensor(x).tanh()


def silu(x: Any, inplace: bool = False) -> Tensor:
    x = as_tensor(x)
    return x * sigmoid(x)


def dropout(x: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Inverted dropout with a counter-based mask (see `alpha_jit.nn.random`), PyTorch's
    signature: identity when `training` is False or p is 0. `inplace` is accepted and means
    nothing (a traced step has no in-place ops)."""
    x = as_tensor(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
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


def log_softmax(x: Any, dim: int | None = None, *, axis: int | None = None,
                dtype: Any = None) -> Tensor:
    """x - logsumexp(x) along `dim` (numpy's `axis=` too). Without either, PyTorch's
    deprecated implicit choice: dim 0 for 0-, 1- and 3-D inputs, else 1 (with its warning)."""
    x = as_tensor(x) if dtype is None else as_tensor(x).astype(dtype)
    d = axis if axis is not None else dim
    if d is None:
        import warnings

        d = 0 if x.ndim in (0, 1, 3) else 1
        warnings.warn("Implicit dimension choice for softmax has been deprecated. Change the "
                      "call to include dim=X as an argument.", UserWarning, stacklevel=3)
    return x - x.logsumexp(d, keepdim=True)


def softmax(x: Any, dim: int | None = None, *, axis: int | None = None,
            dtype: Any = None) -> Tensor:
    return log_softmax(x, dim, axis=axis, dtype=dtype).exp()


def one_hot(labels: Any, num_classes: int = -1) -> Tensor:
    """i32 [..., num_classes] with 1 at each label (PyTorch's is int64; alpha_jit's integers
    are 32-bit). num_classes must be given: inferring it would read the data."""
    y = as_tensor(labels)
    if num_classes < 1:
        raise ShapeError("one_hot", "num_classes must be given (inferring it from the labels "
                         "would need their values while tracing)",
                         trace.current().provenance().where())
    shape = (*y.shape, num_classes)
    y_b = y.reshape(*y.shape, 1).broadcast_to(shape)
    return y_b.eq(iota(shape, len(shape) - 1)).astype(dtypes.int32)


def _reduce_loss(op: str, elems: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return elems.mean()
    if reduction == "sum":
        return elems.sum()
    if reduction == "none":
        return elems
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def mse_loss(input: Any, target: Any, reduction: str = "mean") -> Tensor:  # noqa: A002
    d = as_tensor(input) - target
    return _reduce_loss("mse_loss", d * d, reduction)


def l1_loss(input: Any, target: Any, reduction: str = "mean") -> Tensor:  # noqa: A002
    return _reduce_loss("l1_loss", (as_tensor(input) - target).abs(), reduction)


def nll_loss(input: Any, target: Any, weight: Any = None,  # noqa: A002
             ignore_index: int | None = None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer targets [N] under log-probabilities [N, C]. A
    target outside [0, C) gives NaN (an argument is range-checked before the step runs);
    `ignore_index` rows count for nothing, as in `cross_entropy`."""
    logp, y = as_tensor(input), as_tensor(target)
    where_ = trace.current().provenance().where()
    if weight is not None:
        raise TraceError("nll_loss", "class weights are not supported; multiply the per-row "
                         "losses (reduction='none') by weight[target] instead", where_)
    if logp.ndim != 2 or y.shape != logp.shape[:1] or y.dtype != dtypes.int32:
        raise ShapeError("nll_loss", f"expects log-probabilities [N, C] and integer targets "
                         f"[N], got {logp.dtype}{list(logp.shape)} and {y.dtype}{list(y.shape)}",
                         where_)
    c = logp.shape[1]
    note_index_bound(y, c, "nll_loss", also=ignore_index)
    picked = (logp * one_hot(y, c)).sum(-1)
    rows = where((y >= 0) & (y < c), -picked, float("nan"))
    if ignore_index is not None:
        keep = y.ne(ignore_index)
        rows = where(keep, rows, 0.0)
        if reduction == "mean":  # all ignored: 0, as cross_entropy
            return rows.sum() / maximum(keep.sum(), 1.0)
    return _reduce_loss("nll_loss", rows, reduction)


def layer_norm(input: Any, normalized_shape: Any, weight: Any = None,  # noqa: A002
               bias: Any = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension (one fused kernel per direction)."""
    x = as_tensor(input)
    dim = _last_dim("layer_norm", x, normalized_shape)
    w = weight if weight is not None else full((dim,), 1.0, x.dtype)
    args = [x, w] + ([bias] if bias is not None else [])
    return trace.apply("layer_norm", args, {"eps": float(eps)})


def rms_norm(input: Any, normalized_shape: Any, weight: Any = None,  # noqa: A002
             eps: float | None = None) -> Tensor:
    """RMSNorm over the last dimension; eps None is f32's machine epsilon, as PyTorch's."""
    x = as_tensor(input)
    dim = _last_dim("rms_norm", x, normalized_shape)
    w = weight if weight is not None else full((dim,), 1.0, x.dtype)
    e = float(np.finfo(np.float32).eps) if eps is None else float(eps)
    return trace.apply("rms_norm", [x, w], {"eps": e})


def _last_dim(op: str, x: Tensor, normalized_shape: Any) -> int:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1 or x.ndim < 1 or shape[0] != x.shape[-1]:
        raise ShapeError(op, f"normalizes over the last dimension only; normalized_shape "
                         f"{shape} does not match input {x.shape} (reshape so the normalized "
                         "dimensions are one)", trace.current().provenance().where())
    return shape[0]


def pad(input: Any, pad: Sequence[int], mode: str = "constant",  # noqa: A002
        value: float = 0.0) -> Tensor:
    """PyTorch's F.pad: (left, right) pairs from the last dimension backwards; constant only."""
    x = as_tensor(input)
    if mode != "constant" or len(pad) % 2 or len(pad) // 2 > x.ndim or min(pad, default=0) < 0:
        raise ShapeError("pad", f"supports mode='constant' with non-negative (before, after) "
                         f"pairs for at most {x.ndim} dimensions; got pad={tuple(pad)}, "
                         f"mode={mode!r}", trace.current().provenance().where())
    pads = [(0, 0)] * x.ndim
    for i in range(len(pad) // 2):
        pads[x.ndim - 1 - i] = (int(pad[2 * i]), int(pad[2 * i + 1]))
    out = pad_zeros(x, pads)
    if value != 0.0:  # the padding is where a padded ones tensor is 0 (a select: inf, NaN)
        out = where(pad_zeros(full(x.shape, 1.0, x.dtype), pads), out, float(value))
    return out


def cross_entropy(logits: Any, labels: Any, weight: Any = None, ignore_index: int | None = None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Negative log-likelihood of integer `labels` [N] under `logits` [N, C], computed
    stably through log-softmax in one fused kernel. Labels equal to `ignore_index` count for
    nothing (the mean is over the others). `label_smoothing` mixes in the uniform target as
    PyTorch does. Unlike PyTorch (default -100), nothing is ignored by default: a label of
    -100 is then out of range, an error before the step runs, never a quiet loss."""
    if weight is not None:
        raise TraceError("cross_entropy", "class weights are not supported; multiply the "
                         "per-row losses (reduction='none') by weight[labels] instead",
                         trace.current().provenance().where())
    z, y = as_tensor(logits), as_tensor(labels)
    ctx = trace.current()
    at = ctx.provenance().where()
    if y.dtype != dtypes.int32:
        raise DTypeError("cross_entropy", f"labels must be integer class indices, got "
                         f"{y.dtype}{list(y.shape)} (logits {z.dtype}{list(z.shape)})", at)
    if z.ndim != 2 or y.shape != z.shape[:1]:
        raise ShapeError("cross_entropy", f"expects logits [N, C] and labels [N], got logits "
                         f"{z.shape} and labels {y.shape}", at)
    note_index_bound(y, z.shape[1], "cross_entropy", also=ignore_index)
    # one fused kernel: per row (lse - z[y], lse) in f32, no one-hot; the backward forms
    # softmax - onehot on the fly from the saved lse (ir/ops/rowwise.py)
    both = trace.apply("cross_entropy_rows", [z, y], {"ignore_index": ignore_index})
    rows = both[:, 0]
    if label_smoothing:
        # the uniform target's loss is mean_c(lse - z_c) = lse - mean(z)
        smooth = both[:, 1] - z.mean(-1).astype(dtypes.float32)
        if ignore_index is not None:
            smooth = smooth * y.ne(ignore_index)
        rows = rows * (1.0 - label_smoothing) + smooth * label_smoothing
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    elif reduction != "mean":
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got "
                         f"{reduction!r}")
    elif ignore_index is None:
        loss = rows.mean()
    else:  # an ignored row's loss is 0 already; every row ignored: a loss (and gradient) of
        # 0, where PyTorch gives NaN that would reach the weights
        loss = rows.sum() / maximum(y.ne(ignore_index).sum(), 1.0)
    # under autocast the loss is f32 whatever the logits' dtype (PyTorch's autocast runs
    # cross_entropy in f32): a bf16/f16 loss would round it, and an f16 one overflows the
    # loss scale
    return loss if ctx.autocast is not None else loss.astype(z.dtype)


def embedding(input: Any, weight: Any, padding_idx: int | None = None,  # noqa: A002
              **unsupported: Any) -> Tensor:
    """Rows of `weight` [V, D] at integer ids. `padding_idx` rows get no gradient."""
    if any(v not in (None, False, 2.0) for v in unsupported.values()):
        raise TraceError("embedding", f"options {sorted(unsupported)} are not supported "
                         "(max_norm, scale_grad_by_freq, sparse)",
                         trace.current().provenance().where())
    t, i = as_tensor(weight), as_tensor(input)
    note_index_bound(i, t.shape[0], "embedding")
    out = trace.apply("gather_rows", [t, i])
    if padding_idx is not None:
        pad_row = i.eq(padding_idx % t.shape[0]).reshape(*i.shape, 1)
        out = out * (1.0 - pad_row) + out.detach() * pad_row  # same values, no gradient
    return out


def note_index_bound(ids: Tensor, high: int, op: str, also: int | None = None,
                     low: int = 0) -> None:
    """Ids that come straight from a step argument are range-checked on every call, before
    any GPU work: an out-of-range id would otherwise read or drop memory silently. `also`
    is one more allowed value (an ignore_index); `low` < 0 allows negative indices (which
    indexing wraps)."""
    ctx = trace.current()
    g = ctx.graph
    node = ids.node
    while g.op(node) in ("reshape",):
        node = g.args(node)[0]
    if g.op(node) == "input":
        idx = g.attrs(node)["index"]
        lo, hi = low, high
        if idx in ctx.index_bounds:
            lo = max(lo, ctx.index_bounds[idx][0])
            hi = min(hi, ctx.index_bounds[idx][1])
            also = also if also == ctx.index_bounds[idx][4] else None
        ctx.index_bounds[idx] = (lo, hi, op, ctx.provenance().where(), also)


def scaled_dot_product_attention(q: Any, k: Any, v: Any, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """softmax(q @ k^T * scale [causal mask]) @ v as one fused `attention` op (flash kernels
    forward and backward, no [T, T] tensor), PyTorch's signature. q [B, H, T, hd], k and v
    [B, Hkv, T, hd] with H a multiple of Hkv (grouped-query attention, with or without
    `enable_gqa`). Under `precision="bf16"|"f16"` q, k, v are read in the low type and the
    result is f32, like a GEMM. `scale` defaults to 1/sqrt(hd).

    `attn_mask` runs unfused (scores materialised). A boolean mask keeps its True positions
    (PyTorch's bool mask): a numpy bool array, a bool buffer, a comparison (`a > b`, `.bool()`)
    or `&`/`|`/`~` of those; any other float tensor is added to the scores (PyTorch's float
    mask). Integer masks raise. A row with nothing kept gives 0, as PyTorch's."""
    import math

    q, k, v = as_tensor(q), as_tensor(k), as_tensor(v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1), got "
                         f"{dropout_p}")
    if attn_mask is not None:
        m = as_tensor(attn_mask)
        if not m.dtype.is_float:
            raise DTypeError("scaled_dot_product_attention", f"attn_mask must be boolean (a "
                             f"comparison, a numpy bool array) or float (added to the scores), "
                             f"got {m.dtype}{list(m.shape)}", trace.current().provenance().where())
        if _is_bool_mask(m):
            m = where(m, 0.0, float("-inf"))
        return _attention_unfused(q, k, v, is_causal, scale, dropout_p, m)
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


_MASK_OPS = ("lt", "le", "gt", "ge", "eq", "ne")


def _is_bool_mask(m: Tensor) -> bool:
    """Whether `m` is a boolean mask by construction (alpha_jit has no bool dtype: masks are
    f32 1.0 / 0.0): a comparison, a bool array or buffer, views of those, & and | of them."""
    ctx = trace.current()
    g = ctx.graph

    def walk(n: int) -> bool:
        op = g.op(n)
        if op in _MASK_OPS:
            return True
        if op in ("reshape", "broadcast_to", "transpose", "slice", "cast"):
            return walk(g.args(n)[0])
        if op in ("mul", "maximum", "minimum"):  # &, |
            return all(walk(a) for a in g.args(n))
        if op == "state":
            return bool(getattr(ctx.state.get(g.attrs(n)["key"]), "is_mask", False))
        return False

    return walk(m.node)


def _attention_unfused(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                       dropout_p: float, mask: Tensor | None = None) -> Tensor:
    if q.ndim == 4 and k.ndim == 4 and k.shape[1] != q.shape[1] and k.shape[1] \
            and q.shape[1] % k.shape[1] == 0:  # GQA: each kv head serves H / Hkv query heads
        b, hkv, t, hd = k.shape
        rep = q.shape[1] // hkv
        k, v = (z.reshape(b, hkv, 1, t, hd).broadcast_to((b, hkv, rep, t, hd))
                .reshape(b, hkv * rep, t, hd) for z in (k, v))
    att = (q @ k.swap_last()) * scale
    if mask is not None:
        att = att + mask
    if causal:
        t, s = att.shape[-2], att.shape[-1]
        att = where(iota((t, s), 0) >= iota((t, s), 1), att, float("-inf"))
    if mask is None:
        return dropout(softmax(att, -1), dropout_p) @ v
    # a row with nothing kept gives 0, as PyTorch's attention: its scores become 0 before
    # the softmax (an all -inf row would make the softmax and its gradient NaN)
    empty = att.amax(-1, keepdim=True).eq(float("-inf"))
    p = dropout(softmax(where(empty, 0.0, att), -1), dropout_p)
    return where(empty, 0.0, p) @ v
