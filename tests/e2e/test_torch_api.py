"""The PyTorch-shaped API through the public surface, as a porting user writes it.

One expression, two libraries: each case is a function of a module (`alpha_jit` or `torch`)
and its inputs, run once compiled by alpha_jit and once by PyTorch on the same numpy data, so
a name that behaves differently (a default, a keyword, a return type) fails here. Without
torch, the same expressions still run against numpy expectations in the other tests below.
"""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.nn import functional as AF

RNG = np.random.default_rng(7)
X = RNG.normal(size=(4, 6)).astype(np.float32)
Y = RNG.normal(size=(4, 6)).astype(np.float32)
X3 = RNG.normal(size=(2, 3, 4)).astype(np.float32)
IDX = np.array([2, 0, 3], np.int32)

# (name, fn(L, F, *tensors), inputs): L is alpha_jit or torch, F its nn.functional
SAME = [
    ("sum_dim_keepdim", lambda L, F, x: x.sum(dim=1, keepdim=True), [X]),
    ("sum_dims", lambda L, F, x: L.sum(x, (0, 2)), [X3]),
    ("mean_dim", lambda L, F, x: x.mean(-1), [X3]),
    ("var_std", lambda L, F, x: x.var(1) + x.std(0).sum() + x.var(unbiased=False), [X]),
    ("var_correction", lambda L, F, x: x.var(dim=0, correction=0, keepdim=True), [X]),
    ("max_dim", lambda L, F, x: x.max(dim=1).values + x.max(1)[1].float(), [X]),
    ("min_all_amax", lambda L, F, x: x.min() + L.amax(x, dim=(0, 1)), [X3]),
    ("max_elementwise", lambda L, F, x, y: L.max(x, y) + L.minimum(x, y), [X, Y]),
    ("argmax_argmin", lambda L, F, x: (x.argmax(dim=0) * 10 + x.argmin(1)[:1]).float(), [X]),
    ("argmax_flat", lambda L, F, x: x.argmax().float(), [X3]),
    ("permute_view_flatten", lambda L, F, x: x.permute(2, 0, 1).reshape(4, 6).reshape(-1)
     + x.flatten(1).flatten() + x.contiguous().view(24), [X3]),
    ("transpose_two_dims", lambda L, F, x: x.transpose(0, 2).transpose(1, 2) * 1.0, [X3]),
    ("transpose_2d_same_dims", lambda L, F, x: x.transpose(0, 1) + x.t() + x.T, [X]),
    ("unsqueeze_squeeze", lambda L, F, x: x.unsqueeze(1).squeeze(1).unsqueeze(-1).squeeze(),
     [X]),
    ("expand_repeat", lambda L, F, x: x[:, :1].expand(-1, 6) + x.repeat(1, 2)[:, 3:9], [X]),
    ("split_chunk", lambda L, F, x: L.cat(x.split(2, 1)[::-1], 1) + L.cat(x.chunk(3, 0), 0),
     [X]),
    ("split_sections", lambda L, F, x: x.split([1, 5], dim=1)[1].sum(1), [X]),
    ("stack_cat", lambda L, F, x, y: L.stack([x, y], dim=1).sum(1) + L.cat([x, y])[2:6],
     [X, Y]),
    ("index_none_ellipsis_step", lambda L, F, x: x[None, ..., ::2] + x[-1, 1::3].sum(), [X3]),
    ("index_negative_and_array", lambda L, F, x: x[-2] + x[[0, 3, -1]].sum(0)
     + x[:, [1, -2]].sum(1, keepdim=True)[0], [X]),
    ("index_tensor", lambda L, F, x, i: x[i] * 2 + x[:, i].sum(), [X, IDX]),
    ("clamp_masked_fill", lambda L, F, x: x.clamp(-0.5, 0.5) + x.clamp(min=0.1)
     + x.masked_fill(x > 0.3, -2.0), [X]),
    ("logic_masks", lambda L, F, x, y: L.where((x > 0) & ~(y < 0) | (x < -1), x, y), [X, Y]),
    ("trig_floor_mod", lambda L, F, x: x.sin() + L.cos(x * 3) + (x * 4).floor()
     + x % 0.7 + (-x) % 0.7 + x // 0.3, [X]),
    ("pow_forms", lambda L, F, x, y: x.abs() ** y + 2 ** x + x ** 3 + L.pow(x.abs(), 0.5),
     [X, Y]),
    ("sigmoid_silu_gelu", lambda L, F, x: x.sigmoid() + F.silu(x) + F.gelu(x)
     + F.gelu(x, approximate="tanh") + L.erf(x), [X]),
    ("softmax_dims", lambda L, F, x: F.softmax(x, dim=0) + F.log_softmax(x, dim=-1)
     + x.softmax(1), [X]),
    ("losses", lambda L, F, x, y: F.mse_loss(x, y) + F.l1_loss(x, y, reduction="sum")
     + F.mse_loss(x, y, reduction="none").mean(0).sum(), [X, Y]),
    ("layer_norm_fn", lambda L, F, x: F.layer_norm(x, (6,)) + F.layer_norm(x, [6], eps=1e-3),
     [X]),
    ("cross_entropy_options", lambda L, F, x, i: F.cross_entropy(x[:3], i, label_smoothing=0.1)
     + F.cross_entropy(x[:3], i, reduction="sum"), [X, IDX]),
    ("one_hot", lambda L, F, i: F.one_hot(i, 5).float() * 1.5, [IDX]),
    ("factories", lambda L, F, x: x + L.arange(6) + L.ones(4, 6) * 2 + L.zeros_like(x)
     + L.full((4, 6), 0.5) + L.arange(0.5, 3.5, 0.5) + L.ones_like(x).tril(1)
     + L.eye(4, 6) + L.linspace(-1.0, 1.0, 6) + L.triu(L.ones(4, 6), -1), [X]),
    ("int_float_promotion", lambda L, F, x, i: x[:3, 0] * i + i / 2 + i * 0.5 + i // 2, [X, IDX]),
    ("sdpa_bool_mask", lambda L, F, q: F.scaled_dot_product_attention(
        q, q * 0.5, q, np.tril(np.ones((3, 3), bool)) if L is aj else
        L.tensor(np.tril(np.ones((3, 3), bool)))), [X3[None, :, :3, :]]),
    ("sdpa_causal_gqa", lambda L, F, q, k: F.scaled_dot_product_attention(
        q, k, k, is_causal=True, enable_gqa=True),
     [RNG.normal(size=(1, 4, 5, 8)).astype(np.float32),
      RNG.normal(size=(1, 2, 5, 8)).astype(np.float32)]),
]


@pytest.mark.parametrize("name,fn,inputs", SAME, ids=[c[0] for c in SAME])
def test_same_expression_as_pytorch(name, fn, inputs):
    torch = pytest.importorskip("torch", reason="the reference is PyTorch on the same inputs")
    import torch.nn.functional as TF

    got = aj.compile(lambda *t: fn(aj, AF, *t))(*inputs).numpy()
    want = fn(torch, TF, *[torch.from_numpy(a).long() if a.dtype == np.int32 else
                           torch.from_numpy(a) for a in inputs]).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=2e-5, atol=2e-5)


def test_slice_of_a_parameter_gets_its_gradient_only_inside_the_slice():
    """pad of a constant (the cotangent of sum over a slice) once filled the padding too."""
    p = nn.Parameter(np.arange(5, dtype=np.float32))
    opt = nn.optim.SGD([p], lr=1.0)

    @aj.compile
    def step(x):
        loss = p[1:3].sum() + p[::2].sum() * 2.0 + x.sum()
        loss.backward()
        opt.step()
        return loss

    step(np.ones(3, np.float32))
    np.testing.assert_array_equal(p.numpy(), [-2.0, 0.0, -1.0, 3.0, 2.0])


def test_detach_stops_the_gradient():
    p = nn.Parameter(np.array([1.0, 2.0, 3.0], np.float32))
    opt = nn.optim.SGD([p], lr=1.0)

    @aj.compile
    def step():
        loss = (p * p.detach()).sum()  # d/dp = p.detach(), not 2p
        loss.backward()
        opt.step()
        return loss

    step()
    np.testing.assert_array_equal(p.numpy(), [0.0, 0.0, 0.0])


def test_numpy_constants_are_their_value_when_traced():
    table = np.array([1.0, 2.0, 3.0])  # float64: becomes f32

    @aj.compile
    def f(x):
        return x * table + np.float32(1.0)

    np.testing.assert_array_equal(f(np.ones(3, np.float32)).numpy(), [2.0, 3.0, 4.0])
    table[:] = 0.0  # the step keeps the traced value, like torch.compile and jax.jit
    np.testing.assert_array_equal(f(np.ones(3, np.float32)).numpy(), [2.0, 3.0, 4.0])


def test_max_with_dim_is_values_and_indices():
    out = aj.compile(lambda x: x.max(dim=1))(X)
    values, indices = out
    assert out.values is values and out.indices is indices
    np.testing.assert_array_equal(values.numpy(), X.max(1))
    np.testing.assert_array_equal(indices.numpy(), X.argmax(1))
    assert indices.numpy().dtype == np.int32


def test_argmax_counts_nan_as_largest_and_takes_the_first_tie():
    x = np.array([[1.0, 3.0, 3.0, np.nan, 0.0], [2.0, 2.0, 1.0, 0.0, -1.0]], np.float32)
    got = aj.compile(lambda t: (t.argmax(1), t.argmin(1)))(x)
    np.testing.assert_array_equal(got[0].numpy(), [3, 0])
    np.testing.assert_array_equal(got[1].numpy(), [3, 4])


@pytest.mark.filterwarnings("ignore:invalid value")
def test_special_values_of_the_new_math():
    x = np.array([0.0, -0.0, 1e4, -3e3, np.inf, -np.inf, np.nan, 1e-30, 7.5, -2.5, 9.9e4,
                  -2e5], np.float32)
    got = aj.compile(lambda t: (t.sin(), t.cos(), aj.erf(t), t.floor(), t % 2.0,
                                t ** 2.5, 2.0 ** t, t ** t.floor()))(x)
    import math

    erf = np.array([math.erf(v) if not np.isnan(v) else np.nan for v in x.astype(np.float64)])
    x64 = np.where(np.abs(x) <= 1e5, x.astype(np.float64), np.nan)  # NaN past 1e5: documented
    want = [np.sin(x64), np.cos(x64), erf, np.floor(x),
            np.mod(x, np.float32(2.0)), np.power(x, np.float32(2.5)),
            np.power(np.float32(2.0), x), np.power(x, np.floor(x))]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.astype(np.float32), rtol=2e-6, atol=2e-6,
                                   equal_nan=True)


def test_errors_name_the_call_and_the_alternative():
    with pytest.raises(aj.TraceError, match="permute"):
        aj.compile(lambda x: x.transpose(2, 0, 1))(X3)
    with pytest.raises(aj.TraceError, match="no in-place writes"):
        aj.compile(lambda x: x.__setitem__(0, 1.0))(X)
    with pytest.raises(aj.TraceError, match="boolean-mask indexing"):
        aj.compile(lambda x: x[np.ones((4, 6), bool)])(X)
    with pytest.raises(aj.ShapeError, match="out of range for dimension 0"):
        aj.compile(lambda x: x[[0, 9]])(X)
    with pytest.raises(aj.ShapeError, match="num_classes must be given"):
        aj.compile(lambda i: AF.one_hot(i))(IDX)


def test_calling_a_model_outside_compile_says_how_to_compile_it():
    model = nn.Linear(6, 2)
    with pytest.raises(aj.TraceError, match=r"inside a function decorated with "
                       r"@alpha_jit.compile.*Wrap the call") as e:
        model(X)
    assert "cannot use a ndarray" not in str(e.value)
    assert "test_torch_api.py" in str(e.value)  # the user's line


# ---- found in review: each of these once gave a quiet wrong answer --------------------------
def test_replacing_a_submodule_or_parameter_keeps_its_place():
    s = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    s[0] = nn.Linear(6, 6)
    assert list(s.state_dict())[:2] == ["0.weight", "0.bias"]
    w0, b0 = s[0].weight.numpy(), s[0].bias.numpy()
    w2, b2 = s[2].weight.numpy(), s[2].bias.numpy()
    want = np.maximum(X @ w0.T + b0, 0) @ w2.T + b2
    np.testing.assert_allclose(aj.compile(lambda x: s(x))(X).numpy(), want, rtol=1e-5,
                               atol=1e-6)
    ln = nn.LayerNorm(6)
    ln.weight = nn.Parameter(np.full(6, 2.0, np.float32))
    assert [n for n, _ in ln.named_parameters()] == ["weight", "bias"]


def test_a_replaced_parameter_retraces_the_step():
    lin = nn.Linear(6, 2)
    f = aj.compile(lambda x: lin(x))
    f(X)
    lin.weight = nn.Parameter(np.zeros((2, 6), np.float32))
    np.testing.assert_allclose(f(X).numpy(), np.broadcast_to(lin.bias.numpy(), (4, 2)))
    assert f.traces == 2


def test_numpy_scalars_on_the_left_of_operators():
    c = np.float32(0.5)
    got = aj.compile(lambda x: (c * x, c + x, (c < x) * 1.0, np.float64(2.0) ** x))(X)
    want = [c * X, c + X, (c < X) * 1.0, 2.0 ** X]
    for g, w in zip(got, want, strict=True):
        assert g.numpy().dtype == np.float32
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-6)


def test_pad_with_infinite_value_keeps_the_interior():
    got = aj.compile(lambda x: AF.pad(x, (1, 1), value=float("-inf")))(X).numpy()
    assert np.isneginf(got[:, 0]).all() and np.isneginf(got[:, -1]).all()
    np.testing.assert_array_equal(got[:, 1:-1], X)


def test_nll_loss_ignores_and_range_checks():
    logp = np.log(np.full((4, 5), 0.2, np.float32))
    y = np.array([0, -100, 3, -100], np.int32)
    got = aj.compile(lambda lp, t: AF.nll_loss(lp, t, ignore_index=-100))(logp, y)
    assert abs(float(got) - np.log(5.0)) < 1e-6
    with pytest.raises(aj.AlphaJitError, match="outside"):
        aj.compile(lambda lp, t: AF.nll_loss(lp, t))(logp, np.array([0, 7, 1, 2], np.int32))


def test_attention_masks_from_comparisons_keep_rather_than_add():
    q = RNG.normal(size=(1, 2, 4, 8)).astype(np.float32)
    keep = np.tril(np.ones((4, 4), bool))
    want = aj.compile(lambda q: AF.scaled_dot_product_attention(q, q, q, keep))(q).numpy()
    forms = [lambda q: AF.scaled_dot_product_attention(q, q, q, aj.ones(4, 4).tril().bool()),
             lambda q: AF.scaled_dot_product_attention(
                 q, q, q, aj.arange(4).unsqueeze(1) >= aj.arange(4)),
             lambda q: AF.scaled_dot_product_attention(q, q, q, is_causal=True)]
    for form in forms:
        np.testing.assert_allclose(aj.compile(form)(q).numpy(), want, rtol=1e-5, atol=1e-6)
    nothing = np.zeros((4, 4), bool)
    out = aj.compile(lambda q: AF.scaled_dot_product_attention(q, q, q, nothing))(q).numpy()
    np.testing.assert_array_equal(out, 0.0)  # PyTorch: a row with nothing kept gives 0
    with pytest.raises(aj.DTypeError, match="attn_mask"):
        aj.compile(lambda q, m: AF.scaled_dot_product_attention(q, q, q, m))(
            q, keep.astype(np.int32))


def test_max_gradient_with_ties_matches_pytorch():
    p = nn.Parameter(np.array([[1.0, 3.0, 3.0, 2.0]], np.float32))
    opt = nn.optim.SGD([p], lr=1.0)

    @aj.compile
    def step():
        loss = p.amax() + p.max(dim=1).values.sum() * 10.0
        loss.backward()
        opt.step()

    step()  # amax shares its gradient among ties, max(dim) sends it to the returned index
    np.testing.assert_allclose(p.numpy(), [[1.0, 3.0 - 0.5 - 10.0, 3.0 - 0.5, 2.0]])


def test_float_floor_division_and_remainder_are_exact():
    a = np.array([1, 2, -1, 5, -5, 0, 7.5, -7.5, 1e6, 3, 0.3], np.float32)
    b = np.array([0.1, 0.1, 0.1, np.inf, np.inf, np.inf, -2, 2, 0.7, 0, -np.inf], np.float32)
    with np.errstate(all="ignore"):
        want_q, want_r = np.floor_divide(a, b), np.remainder(a, b)
    q, r = aj.compile(lambda a, b: (a // b, a % b))(a, b)
    np.testing.assert_array_equal(q.numpy(), want_q)
    np.testing.assert_array_equal(r.numpy(), want_r)


def test_integer_reductions_are_exact_past_2_to_the_24():
    i = np.array([[16777216, 16777217, -5], [3, -2**31 + 1, 2**31 - 1]], np.int32)
    got = aj.compile(lambda t: (t.argmax(1), t.amax(1), t.min(dim=0).values, t.sum(1)))(i)
    for g, w in zip(got, [i.argmax(1), i.max(1), i.min(0), i.sum(1)], strict=True):
        np.testing.assert_array_equal(g.numpy(), w)


def test_dtypes_follow_pytorch():
    xi = (X * 3).astype(np.int32)
    got = aj.compile(lambda x: (x ** 2, aj.where(x > 0, 1, 0), x.masked_fill(x > 0, 0.5)))(xi)
    for g, w in zip(got, [xi ** 2, np.where(xi > 0, 1, 0), np.where(xi > 0, 0, xi)],
                    strict=True):
        assert g.numpy().dtype == np.int32
        np.testing.assert_array_equal(g.numpy(), w)


def test_empty_selections_and_bad_narrow_raise():
    with pytest.raises(aj.ShapeError, match="selects nothing"):
        aj.compile(lambda x: x[3:1])(X)
    with pytest.raises(aj.ShapeError, match="do not fit"):
        aj.compile(lambda x: x.narrow(0, 3, 4))(X)
    np.testing.assert_array_equal(aj.compile(lambda x: x.narrow(0, -2, 2))(X).numpy(), X[-2:])


def test_replacing_a_submodule_after_compiling_retraces():
    s = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    f = aj.compile(lambda x: s(x))
    f(X)
    s[0] = nn.Linear(6, 6)
    w0, b0 = s[0].weight.numpy(), s[0].bias.numpy()
    want = np.maximum(X @ w0.T + b0, 0) @ s[2].weight.numpy().T + s[2].bias.numpy()
    np.testing.assert_allclose(f(X).numpy(), want, rtol=1e-5, atol=1e-6)
    assert f.traces == 2
    f(X)
    assert f.traces == 2  # and only once


def test_attention_mask_with_causal_and_empty_rows_has_finite_gradients():
    torch = pytest.importorskip("torch", reason="the reference is PyTorch")
    q0 = RNG.normal(size=(1, 2, 4, 8)).astype(np.float32)
    keep = np.ones((4, 4), bool)
    keep[1, :] = False  # nothing kept in row 1
    p = nn.Parameter(q0)
    opt = nn.optim.SGD([p], lr=1.0)

    @aj.compile
    def step():
        out = AF.scaled_dot_product_attention(p, p, p, keep, is_causal=True)
        loss = (out * out).sum()
        loss.backward()
        opt.step()
        return out

    got = step().numpy()
    tq = torch.from_numpy(q0).requires_grad_()
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tq, tq, torch.from_numpy(keep),
                                                           is_causal=True)
    (ref * ref).sum().backward()
    np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p.numpy(), q0 - tq.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_float_floor_division_and_remainder_match_pytorch_on_random_magnitudes():
    torch = pytest.importorskip("torch", reason="the reference is PyTorch")
    rng = np.random.default_rng(3)
    a = np.concatenate([np.array([-0.001, -1, 1e-45, 1e8, 1e35, 0.1, 1e35, 3], np.float32),
                        (rng.normal(size=500) * 10.0 ** rng.integers(-3, 9, 500))
                        .astype(np.float32)])
    b = np.concatenate([np.array([1e5, 1e8, -1, 0.1, 7, 3e38, -1, 0], np.float32),
                        (rng.normal(size=500) * 10.0 ** rng.integers(-3, 4, 500))
                        .astype(np.float32)])
    from alpha_jit.runtime.device import get_device

    if not get_device().caps.denorm_preserve_f32:  # the device may flush them (NVIDIA does)
        sub = lambda x: (x != 0) & (np.abs(x) < np.finfo(np.float32).tiny)  # noqa: E731
        a, b = (x[~(sub(a) | sub(b))] for x in (a, b))
    q, r = aj.compile(lambda a, b: (a // b, a % b))(a, b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    np.testing.assert_array_equal(q.numpy(), torch.floor_divide(ta, tb).numpy())
    np.testing.assert_array_equal(r.numpy(), torch.remainder(ta, tb).numpy())


def test_integer_min_handles_int32_min():
    i = np.array([[-2**31, 5, 2**31 - 1, -2**31]], np.int32)
    got = aj.compile(lambda t: (t.amin(1), t.argmin(1), t.min(), t.min(dim=1).indices))(i)
    for g, w in zip(got, [i.min(1), i.argmin(1), i.min(), i.argmin(1)], strict=True):
        np.testing.assert_array_equal(g.numpy(), w)
