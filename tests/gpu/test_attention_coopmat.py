"""GPU parity for flash attention on cooperative matrices: runs only where the device lists
bf16 16x16x16 cooperative matrices (the H200), skipped elsewhere (lavapipe, CI).

    ALPHA_JIT_DEVICE=0 pytest tests/gpu -q       # on the GPU machine

Each family (forward with lse, dq, dk/dv) as the tensor-core kernel against the SIMT kernel of
the same spec on the same inputs (the SIMT kernels are checked against float64 on lavapipe by
tests/codegen_spirv/test_attention.py), and the forward and gradients against float64 softmax
attention: causal and full, GQA, ragged T, head dims 32 / 64 / 128, f16, strided q/k/v as the
model's QKV projection stores them, [B, T, H, hd] outputs, f32 dO rounded on load, f32 or
16-bit o, T below one fragment, dropout.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from alpha_jit import dtypes
from alpha_jit.codegen_spirv import coopmat, tools
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels import attention as K
from tests.codegen_spirv.test_attention import naive

NAN = 0x7FC00000  # outputs start as NaN: skipped elements show


def _stored(x: np.ndarray, dt: str) -> tuple[np.ndarray, np.ndarray]:
    """(array as the device stores it, its values as float64)."""
    if dt == "bf16":
        bits = dtypes.f32_to_bf16(x.astype(np.float32))
        return bits, dtypes.bf16_to_f32(bits).astype(np.float64)
    if dt == "f16":
        h = x.astype(np.float16)
        return h, h.astype(np.float64)
    return x.astype(np.float32), x.astype(np.float64)


def _run(caps, spec: KernelSpec, arrays: list, outs: list, simt: bool) -> tuple[list, str]:
    from alpha_jit.runtime.testing import run_kernel

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALPHA_JIT_COOPMAT", "0" if simt else "1")
        b = getattr(K, K.FAMILIES[spec.family])(spec, caps)
    tools.validate(b.words, b.name, caps.spirv_target_env())
    assert b.variant.startswith("simt" if simt else "coopmat"), b.variant
    return run_kernel(b, arrays, outs, fill=NAN), b.variant


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(got).any(), "NaN in result"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# (B, H, Hkv, T, hd, causal, dtype, packed qkv, dropout, o's dtype)
CASES = [(2, 4, 4, 256, 64, True, "bf16", True, 0.0, "bf16"),
         (1, 4, 2, 100, 64, True, "bf16", False, 0.0, "f32"),
         (2, 2, 2, 77, 32, False, "bf16", False, 0.0, "bf16"),
         (1, 2, 1, 130, 128, True, "bf16", False, 0.0, "bf16"),
         (1, 3, 3, 64, 64, True, "f16", True, 0.0, "f16"),
         (1, 2, 2, 96, 64, True, "bf16", True, 0.2, "bf16"),
         (1, 2, 1, 150, 64, False, "bf16", False, 0.1, "bf16"),
         (2, 4, 2, 12, 48, True, "bf16", True, 0.0, "f32"),  # GQA packed, T < 16, hd 48
         (1, 2, 2, 40, 96, True, "bf16", False, 0.0, "bf16"),
         # T > 512, causal: the register forward's two row blocks per subgroup, 32-key dq
         # tiles; with dropout across both blocks; not causal: one block
         (1, 2, 1, 600, 64, True, "bf16", False, 0.0, "bf16"),
         (1, 2, 2, 600, 64, True, "bf16", True, 0.1, "bf16"),
         (1, 2, 1, 600, 64, False, "bf16", False, 0.0, "bf16")]


def _registers_where_known(caps, dt: str, family: str, variant: str) -> None:
    """A device whose fragment layout allows it runs the register-softmax kernel: the parity
    below is then that kernel's."""
    from alpha_jit.codegen_spirv.fragments import register_softmax_map
    from alpha_jit.codegen_spirv.kernels import attention_registers as AR

    known = register_softmax_map(caps, {"bf16": "bf16n", "f16": "f16"}[dt]) is not None
    if family in AR._GENERATORS and known:
        assert "registers" in variant, variant


def _close(got, want, tol: float, what: object) -> None:
    """Relative error over the whole tensor, and no element off by more than 10 tol of the
    largest (an error confined to a few rows shows)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert _rel(got, want) < tol, what
    assert np.abs(got - want).max() <= 10 * tol * np.abs(want).max(), what


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_families_match_simt_and_float64(caps, case):
    b, h, hkv, t, hd, causal, dt, packed, drop, odt = case
    if dt == "f16" and not coopmat.supported(caps, "f16"):
        pytest.skip("no f16 fragments")
    rng = np.random.default_rng(t + hd)
    scale = 1.0 / math.sqrt(hd)
    qf = rng.standard_normal((b, h, t, hd))
    kf, vf = rng.standard_normal((2, b, hkv, t, hd))
    wf = rng.standard_normal((b, h, t, hd))  # dO, kept f32 as the model's gradient is
    if packed:  # one [B, T, (H + 2 Hkv) hd] buffer, as the QKV projection writes it
        width = (h + 2 * hkv) * hd
        mem = np.zeros((b, t, width))
        mem[..., :h * hd] = qf.transpose(0, 2, 1, 3).reshape(b, t, h * hd)
        mem[..., h * hd:(h + hkv) * hd] = kf.transpose(0, 2, 1, 3).reshape(b, t, hkv * hd)
        mem[..., (h + hkv) * hd:] = vf.transpose(0, 2, 1, 3).reshape(b, t, hkv * hd)
        st, mem64 = _stored(mem.ravel(), dt)
        arrays = [st, st, st]
        entries = [(dt, off, (t * width, hd, width, 1)) for off in (0, h * hd, (h + hkv) * hd)]
        q, k, v = (np.lib.stride_tricks.as_strided(mem64[e[1]:], shape, [s * 8 for s in e[2]])
                   for e, shape in zip(entries, ((b, h, t, hd), (b, hkv, t, hd),
                                                 (b, hkv, t, hd)), strict=True))
    else:
        (sq, q), (sk, k), (sv, v) = (_stored(x, dt) for x in (qf, kf, vf))
        arrays = [sq.ravel(), sk.ravel(), sv.ravel()]
        entries = [(dt, 0, (x.shape[1] * t * hd, t * hd, hd, 1)) for x in (qf, kf, vf)]
    base = (("b", b), ("h", h), ("hkv", hkv), ("t", t), ("hd", hd), ("causal", causal),
            ("scale", scale), ("q", entries[0]), ("k", entries[1]), ("v", entries[2]))
    extra, ctr = (), []
    if drop:
        extra = (("dropout", drop), ("seed", 7), ("salt", 3), ("ctr", 1))
        ctr = [np.array([0, 5], np.int32)]
    layout = (("out_layout", "bthd"),) if packed else ()
    fwd = KernelSpec("attention_fwd", "fwd", (*base, *extra, ("out_dtype", "f32"),
                                              ("outputs", ("o", "lse")), *layout))
    outs_f = [((b * h * t * hd,), np.float32), ((b * h * t,), np.float32)]
    (o_s, lse_s), _ = _run(caps, fwd, arrays + ctr, outs_f, simt=True)
    (o_c, lse_c), variant = _run(caps, fwd, arrays + ctr, outs_f, simt=False)
    _registers_where_known(caps, dt, "attention_fwd", variant)
    if "registers" in variant and t > 512:
        assert ("(2 per subgroup)" in variant) == causal, variant
    _close(o_c, o_s, 1e-2, variant)
    _close(lse_c, lse_s, 1e-3, variant)

    # backward from the SIMT forward's o (stored as the model stores it) and lse
    o_bhtd = o_s.reshape((b, t, h, hd) if packed else (b, h, t, hd))
    if packed:
        o_bhtd = o_bhtd.transpose(0, 2, 1, 3)
    o_st, _ = _stored(np.ascontiguousarray(o_bhtd).ravel(), odt)
    w_st = wf.astype(np.float32).ravel()
    bh = (("o", (odt, 0, (h * t * hd, t * hd, hd, 1))), ("lse", ("f32", 0, (h * t, t, 1))),
          ("do", ("f32", 0, (h * t * hd, t * hd, hd, 1))))
    ins_b = arrays + [o_st, lse_s, w_st] + ctr
    dq = KernelSpec("attention_dq", "dq", (*base, *bh, *extra, *layout))
    dkdv = KernelSpec("attention_dkdv", "dkdv", (*base, *bh, *extra, ("outputs", ("dk", "dv")),
                                                 *layout))
    (dq_s,), _ = _run(caps, dq, ins_b, [((b * h * t * hd,), np.float32)], simt=True)
    (dq_c,), v_dq = _run(caps, dq, ins_b, [((b * h * t * hd,), np.float32)], simt=False)
    _registers_where_known(caps, dt, "attention_dq", v_dq)
    kv_out = [((b * hkv * t * hd,), np.float32)] * 2
    (dk_s, dv_s), _ = _run(caps, dkdv, ins_b, kv_out, simt=True)
    (dk_c, dv_c), v_kv = _run(caps, dkdv, ins_b, kv_out, simt=False)
    _registers_where_known(caps, dt, "attention_dkdv", v_kv)
    for name, got, want, var in (("dq", dq_c, dq_s, v_dq), ("dk", dk_c, dk_s, v_kv),
                                 ("dv", dv_c, dv_s, v_kv)):
        _close(got, want, 2e-2, (name, var))
    if drop:
        return
    # and against float64 (dO as the kernels multiply it: rounded to the operand type)
    w64 = _stored(wf, dt)[1]
    want = naive(q, k, v, w64, causal, scale)
    shape_q = (b, t, h, hd) if packed else (b, h, t, hd)
    shape_kv = (b, t, hkv, hd) if packed else (b, hkv, t, hd)
    for name, got, ref, shape in (("o", o_c, want[0], shape_q), ("dq", dq_c, want[1], shape_q),
                                  ("dk", dk_c, want[2], shape_kv),
                                  ("dv", dv_c, want[3], shape_kv)):
        g = got.reshape(shape)
        if packed:
            g = g.transpose(0, 2, 1, 3)
        _close(g, ref, 2e-2, name)
