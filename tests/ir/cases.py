"""One table of op cases shared by the reference, compiled and gradient tests.

Each case names the op it exercises, how to build it with the tensor API from traced inputs,
and the inputs (shapes, dtypes, value ranges that keep the op smooth for finite differences).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import alpha_jit as aj
from alpha_jit.ir import trace
from alpha_jit.nn import functional as F
from alpha_jit.nn.random import uniform


@dataclass
class Case:
    name: str
    fn: Callable
    shapes: list[tuple]
    dtypes: list[str] = field(default_factory=list)
    low: float = -2.0
    high: float = 2.0
    int_high: int = 7
    grad: bool = True  # run the numerical gradient check

    def inputs(self, rng: np.random.Generator) -> list[np.ndarray]:
        out = []
        for i, s in enumerate(self.shapes):
            dt = self.dtypes[i] if i < len(self.dtypes) else "f32"
            if dt == "i32":
                out.append(rng.integers(0, self.int_high, s).astype(np.int32))
            else:
                v = rng.uniform(self.low, self.high, s)
                # keep values away from 0 so kinks (relu, abs, max) are not straddled
                v = np.where(np.abs(v) < 0.05, 0.3, v)
                out.append(v.astype(np.float32))
        return out


_MASK = np.tril(np.ones((5, 5), bool))  # a numpy constant captured by the traced function
_TABLE = np.linspace(-1.0, 1.0, 12).reshape(3, 4)

# PyTorch-shaped API (issue 10): every name on top of the IR ops, through the same checks
TORCH_API_CASES = [
    Case("sin_cos", lambda a: a.sin() * aj.cos(a), [(40,)], low=-7.0, high=7.0),
    Case("erf", lambda a: aj.erf(a), [(50,)], low=-3.0, high=3.0),
    Case("floor", lambda a: a.floor() + a * 0.5, [(30,)], low=-3.0, high=3.0),
    Case("floordiv_remainder", lambda a, b: (a // b) + a % b + a % 0.7, [(6, 5), (5,)],
         low=0.5, high=3.0),
    Case("remainder_negative", lambda a: a % -0.7 + (a * 3.0).astype("i32") % 4,
         [(30,)], grad=False),
    Case("pow_tensor", lambda a, b: a ** b + 2.0 ** b, [(4, 5), (5,)], low=0.3, high=2.0),
    Case("detach", lambda a: a * a.detach(), [(9,)], grad=False),  # see test_trust
    Case("var_std", lambda a: a.var(1) + a.std(dim=0, keepdim=True).sum()
         + a.var(unbiased=False), [(6, 7)]),
    Case("min_max_dim", lambda a: a.min(1).values + a.max(dim=0, keepdim=True).values.sum()
         + a.argmax(1).float() + a.argmin(dim=1).float() + aj.amax(a, (0, 1)), [(5, 7)]),
    Case("argmax_flat", lambda a: a.argmax().float() + a.sum(), [(4, 6)]),
    Case("permute_view_flatten", lambda a: a.permute(2, 0, 1).contiguous().view(4, -1)
         .flatten() * 2.0 + a.flatten(1).sum(), [(2, 3, 4)]),
    Case("squeeze_unsqueeze_expand", lambda a: a.unsqueeze(0).expand(3, -1, -1).squeeze()
         * a.squeeze(1).unsqueeze(-1).unsqueeze(1), [(4, 1)]),
    Case("transpose_pair", lambda a: a.transpose(0, 2) * 1.5 + a.mT.sum(), [(2, 3, 4)]),
    Case("split_chunk", lambda a: a.split(2, dim=1)[1] * a.chunk(3, 1)[0]
         + a.split([1, 3, 2], -1)[1][:, :2], [(4, 6)]),
    Case("stack_cat", lambda a, b: aj.stack([a, b], 1).sum(1) + aj.cat([a, b], 0)[1:4],
         [(3, 5), (3, 5)]),
    Case("clamp", lambda a: a.clamp(-0.5, 1.0) + a.clamp(min=0.2) + aj.clamp(a, max=0.1),
         [(40,)]),
    Case("masked_fill_logic", lambda a, b: a.masked_fill((a > 0.5) & ~(b < 0.0), -1.0)
         * ((a < -1.0) | (b > 1.0)), [(6, 7), (7,)]),
    Case("sigmoid_silu", lambda a: a.sigmoid() + F.silu(a) + F.tanh(a), [(40,)], low=-6,
         high=6),
    Case("index_none_ellipsis_step", lambda a: a[None, ..., ::2] * 2.0 + a[-1, 1::3].sum(),
         [(4, 7)]),
    Case("index_int_array", lambda a, i: a[i] * 2.0 + a[:, [3, -1, 0]].sum()
         + a[[1, 1, 2]][..., 1:3].sum(), [(5, 4), (3, 2)], ["f32", "i32"], int_high=5),
    Case("index_negative_tensor", lambda a, i: a[i - 4], [(5, 3), (6,)], ["f32", "i32"],
         int_high=4),
    Case("factories", lambda a: a * aj.arange(5).float() + aj.ones(4, 5) + aj.zeros_like(a)
         + aj.full((5,), 0.5) + aj.arange(0.5, 3.0, 0.5)[:5] + aj.ones_like(a).tril(1)
         + aj.eye(4, 5) + aj.linspace(0.0, 1.0, 5), [(4, 5)]),
    Case("numpy_constants", lambda a: aj.where(_MASK, a, 0.0) + a * aj.tensor(_TABLE[0, 0])
         + (a[:3, :4] * _TABLE).sum(), [(5, 5)]),
    Case("repeat", lambda a: a.repeat(2, 3) * 1.5, [(2, 3)]),
    Case("f_losses", lambda a, b: F.mse_loss(a, b) + F.l1_loss(a, b, reduction="sum")
         + F.mse_loss(a, b, reduction="none")[0, 1], [(4, 6), (4, 6)]),
    Case("f_layer_norm", lambda x, w, b: F.layer_norm(x, (6,), w, b, eps=1e-5)
         + F.layer_norm(x, 6) + F.rms_norm(x, [6], w), [(3, 6), (6,), (6,)]),
    Case("f_softmax_dim", lambda a: F.softmax(a, dim=0) + F.log_softmax(a, 1) + a.softmax(-1),
         [(4, 6)]),
    Case("gelu_exact", lambda a: F.gelu(a) + F.gelu(a, approximate="tanh"), [(31, 7)],
         low=-4, high=4),
    Case("one_hot_nll", lambda z, y: F.nll_loss(F.log_softmax(z, -1), y)
         + F.one_hot(y, 6).float().sum(0)[2], [(7, 6), (7,)], ["f32", "i32"], int_high=6),
    Case("cross_entropy_smooth", lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1)
         + F.cross_entropy(z, y, reduction="none")[2] + F.cross_entropy(
             z, y - 1, ignore_index=-1, reduction="sum", label_smoothing=0.2),
         [(7, 6), (7,)], ["f32", "i32"], int_high=6),
    Case("f_pad", lambda a: F.pad(a, (1, 2), value=0.5) * 2.0 + F.pad(a, (0, 0, 1, 0)).sum(),
         [(3, 4)]),
    Case("embedding_padding_idx", lambda t, i: F.embedding(i, t, padding_idx=2) * 2.0,
         [(5, 3), (6,)], ["f32", "i32"], int_high=5),
    Case("sdpa_mask", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, _MASK)
         + F.scaled_dot_product_attention(q, k, v, attn_mask=aj.where(
             aj.tril(aj.ones(5, 5)) > 0.0, 0.0, float("-inf"))),
         [(1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4)]),
    Case("int_promotion", lambda a, i: a * i + i / 2 + (i * 0.5) + i.float().mean(),
         [(6,), (6,)], ["f32", "i32"], int_high=9),
]

CASES = [
    Case("add_broadcast", lambda a, b: a + b, [(37, 45), (45,)]),
    Case("sub_broadcast", lambda a, b: a - b, [(3, 1, 5), (4, 1)]),
    Case("mul_broadcast", lambda a, b: a * b, [(2, 3, 4), (3, 1)]),
    Case("div", lambda a, b: a / b, [(33,), (33,)], low=0.5, high=2.0),
    Case("maximum", lambda a, b: aj.maximum(a, b), [(10, 6), (10, 6)]),
    Case("minimum", lambda a, b: aj.minimum(a, b), [(10, 6), (6,)]),
    Case("lt", lambda a, b: (a < b) * a, [(9, 5), (5,)]),
    Case("le", lambda a, b: (a <= b) * b, [(9, 5), (9, 5)]),
    Case("gt", lambda a, b: (a > b) * a, [(9, 5), (9, 1)]),
    Case("ge", lambda a, b: (a >= 0.1) * b, [(9, 5), (9, 5)]),
    Case("eq_int", lambda a, b: a.eq(b) * 1.5, [(40,), (40,)], ["i32", "i32"], int_high=3,
         grad=False),
    Case("ne", lambda a, b: a.astype("i32").ne(b) * a, [(12,), (12,)], ["f32", "i32"],
         low=0, high=4),
    Case("neg", lambda a: -a, [(17, 3)]),
    Case("exp", lambda a: a.exp(), [(300,)]),
    Case("log", lambda a: a.log(), [(300,)], low=0.1, high=3.0),
    Case("tanh", lambda a: a.tanh(), [(5, 5, 5)]),
    Case("sqrt", lambda a: a.sqrt(), [(65,)], low=0.1, high=4.0),
    Case("rsqrt", lambda a: a.rsqrt(), [(65,)], low=0.2, high=4.0),
    Case("abs", lambda a: a.abs(), [(65,)]),
    Case("relu", lambda a: F.relu(a), [(1000,)]),
    Case("gelu", lambda a: F.gelu(a), [(31, 7)], low=-4, high=4),
    Case("pow_scalar", lambda a: a ** 3.0, [(20,)], low=0.2, high=2.0),
    Case("where", lambda c, a, b: aj.where(c > 0.0, a, b), [(8, 9), (8, 9), (9,)]),
    Case("cast_f32_i32", lambda a: (a * 3.0).astype("i32").astype("f32") + a, [(50,)],
         grad=False),
    Case("iota", lambda a: a * aj.iota(a.shape, 1).astype("f32"), [(6, 11)]),
    Case("copy", lambda a: trace.apply("copy", [a.T]) * 2.0, [(3, 8)]),
    Case("rand_uniform", lambda a: a * (uniform(a.shape) >= 0.3), [(33, 17)]),
    Case("iota_linear", lambda a: a * aj.iota(a.shape, -1).astype("f32"), [(5, 7)]),
    Case("isfinite", lambda a: trace.apply("isfinite", [a.log()]) * a, [(40,)], low=-1.0,
         high=1.0),
    Case("full", lambda a: a + aj.full((4, 5), 0.25), [(4, 5)]),
    Case("transpose", lambda a, b: a.T * b, [(6, 9), (9, 6)]),
    Case("reshape", lambda a: (a * 2.0).reshape(3, 20).exp(), [(6, 10)]),
    Case("reshape_of_transpose", lambda a: a.T.reshape(-1) * 1.5, [(4, 7)]),
    Case("slice", lambda a: a[1:4, 2:] * 2.0 + a[0, :5], [(6, 7)]),
    Case("slice_to_matmul", lambda a, b: a[:, 1:] @ b[2:5], [(5, 4), (7, 3)]),
    Case("pad", lambda a: F.pad(a.exp(), (0, 3, 1, 2)) * 3.0, [(4, 5)]),
    Case("concat", lambda a, b: aj.cat([a, b * 2.0], dim=1), [(3, 4), (3, 2)]),
    Case("broadcast_to", lambda a: a.broadcast_to((5, 3, 4)) * 2.0, [(3, 1)]),
    Case("sum_axis0", lambda a: a.sum(axis=0), [(37, 23)]),
    Case("sum_axis1_keep", lambda a: a.sum(axis=1, keepdims=True) * a, [(19, 1000)]),
    Case("sum_all", lambda a: a.sum(), [(7, 9, 4)]),
    Case("mean", lambda a: a.mean(axis=-1), [(13, 4097)]),
    Case("max", lambda a: a.max(axis=1), [(11, 7)]),
    Case("logsumexp", lambda a: a.logsumexp(axis=-1), [(9, 33)], low=-5, high=5),
    Case("logsumexp_axis0", lambda a: a.logsumexp(axis=0, keepdims=True), [(5, 6)]),
    Case("matmul_2d", lambda a, b: a @ b, [(17, 33), (33, 65)]),
    Case("matmul_tiny", lambda a, b: a @ b, [(1, 1), (1, 1)]),
    Case("matmul_batched", lambda a, b: a @ b, [(3, 5, 8), (3, 8, 4)]),
    Case("matmul_transposed", lambda a, b: a.T @ b.T, [(8, 5), (4, 8)]),
    Case("matmul_broadcast", lambda a, b: a @ b, [(2, 3, 5, 8), (8, 6)]),
    Case("matmul_batch_broadcast", lambda a, b: a @ b, [(3, 5, 8), (1, 8, 6)]),
    Case("gather_rows", lambda t, i: F.embedding(i, t), [(10, 6), (4, 5)], ["f32", "i32"],
         int_high=10),
    Case("scatter_add_rows",
         lambda s, i: trace.apply("scatter_add_rows", [s, i], {"rows": 9}),
         [(12, 5), (12,)], ["f32", "i32"], int_high=6),
    Case("embedding_grad", lambda t, i: (F.embedding(i, t) ** 2.0).sum(axis=0),
         [(7, 3), (12,)], ["f32", "i32"], int_high=7),
    Case("cross_entropy", lambda z, y: F.cross_entropy(z, y), [(13, 10), (13,)], ["f32", "i32"],
         int_high=10),
    Case("cross_entropy_ignore", lambda z, y: F.cross_entropy(z, y - 1, ignore_index=-1),
         [(13, 10), (13,)], ["f32", "i32"], int_high=11),
    Case("softmax", lambda z: F.softmax(z, axis=-1), [(6, 10)]),
    # multi-tensor (ir/ops/multi.py): the norm of several tensors of different shapes
    Case("sum_squares", lambda a, b, c: trace.apply("sum_squares", [a, b, c]),
         [(3, 4), (17,), (2, 3, 5)]),
    # fused row ops (ir/ops/rowwise.py): forward with gradients, backward ops as their VJP calls
    Case("layer_norm", lambda x, w, b: trace.apply("layer_norm", [x, w, b], {"eps": 1e-5}),
         [(3, 5, 37), (37,), (37,)]),
    Case("rms_norm", lambda x, w: trace.apply("rms_norm", [x, w], {"eps": 1e-6}),
         [(11, 29), (29,)]),
    Case("norm_dx_dwb", lambda x, w, g: trace.apply("norm_dx", [x, w, g, trace.apply(
        "norm_stats", [x], {"eps": 1e-5, "rms": False})], {"rms": False}).sum(axis=0)
         + trace.apply("norm_dwb", [x, g, trace.apply("norm_stats", [x], {"eps": 1e-5,
                       "rms": False})], {"rms": False, "bias": True}),
         [(7, 19), (19,), (7, 19)], grad=False),
    Case("cross_entropy_rows_grad", lambda z, y, g: trace.apply(
        "cross_entropy_rows_grad", [z, y, trace.apply("cross_entropy_rows", [z, y],
                                                      {"ignore_index": 3}), g],
        {"ignore_index": 3}), [(9, 13), (9,), (9, 2)], ["f32", "i32", "f32"], int_high=13,
         grad=False),
    Case("attention_causal_gqa",
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
         [(1, 4, 5, 3), (1, 2, 5, 3), (1, 2, 5, 3)]),
    Case("attention_full", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.7),
         [(2, 2, 6, 4), (2, 2, 6, 4), (2, 2, 6, 4)]),
    # the backward ops appear only inside VJPs: each also on its own, with any o, lse and dO
    *[Case(op, lambda q, k, v, o, lse, do, op=op: trace.apply(
        op, [q, k, v, o, lse, do], {"causal": True, "scale": 0.5}),
        [(1, 2, 7, 3), (1, 1, 7, 3), (1, 1, 7, 3), (1, 2, 7, 3), (1, 2, 7), (1, 2, 7, 3)],
        grad=False) for op in ("attention_bwd_dq", "attention_bwd_dk", "attention_bwd_dv")],
    Case("attention_lse", lambda q, k, v: trace.apply(
        "attention_lse", [q, k, v], {"causal": True, "scale": 0.5}) * 1.0,
        [(1, 2, 7, 3), (1, 1, 7, 3), (1, 1, 7, 3)], grad=False),
    *TORCH_API_CASES,
]
