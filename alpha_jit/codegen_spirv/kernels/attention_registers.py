"""Flash attention with the softmax in registers: the tensor-core attention kernels where the
device's fragment layout is known (FlashAttention-2's structure on cooperative matrices).

Why: the shared-memory variant (attention_coopmat.py) stores every product S = q k^T to the
subgroup's scratch, has lanes apply the softmax there and writes P back as 16-bit A
fragments, with a subgroup barrier at each step; on the H200 those round trips, not the
multiplies or the exps, were most of its time. Where `fragments.register_softmax_map` knows
the accumulator's lane layout, and an accumulator's element e sits where an A fragment's
element e does (NVIDIA's mma layout), each lane works on its own elements of S: scale, mask,
exp, the row maximum (its elements of the row, then xor-shuffles between the lanes holding
the row), and P becomes an A fragment by converting element by element. The row sum of P
stays a per-lane partial until the end. Shared memory holds what it did before but S, P and
dS: the streamed tiles (and dk/dv's lse and D), the subgroup's operands on their way into
fragments, and the outputs at the end.

Same specs, bindings, grid, tiling (CmConfig) and results as the shared-memory variant, whose
masking, NaN and dropout rules this kernel keeps; where the layout is unknown or different,
that variant runs.
"""

from __future__ import annotations

from functools import reduce

from .. import coopmat
from ..dsl import Value
from ..fragments import Lanes, RowMap, elements, from_elements, register_softmax_map
from ..kernel import KernelBinary, KernelSpec
from ..scalar import ScalarEmitter, ieee_div, nan_minmax
from . import attention as A
from .attention_coopmat import _ELEM, _F, _NEG_INF, CmConfig, _Kernel, choose

_ADD = lambda a, b: a + b  # noqa: E731 - the combine of a row sum


def _pack(K: _Kernel, values: list[Value]) -> coopmat.Fragment:
    """An A fragment from an accumulator's elements (same layout), rounded to 16 bits."""
    kb = K.kb
    conv = kb.to_bf16n if K.elem == "bf16n" else (lambda x: kb.cast(x, "f16"))
    return from_elements(K.fa, [conv(v) for v in values])


def _lane_places(K: _Kernel, rm: RowMap) -> tuple:
    """(Lanes, the rows of each of the lane's element classes (K.row0 + row), each element's
    column, each element's class)."""
    L = Lanes(K.kb, rm, K.lane)
    rows = [K.row0 + L.row(ci) for ci in range(len(rm.classes))]
    cols = [L.col(e) for e in range(rm.length)]
    return L, rows, cols, [rm.cls(e) for e in range(rm.length)]


def generate_fwd(spec: KernelSpec, caps: object, cfg: CmConfig, rm: RowMap) -> KernelBinary:
    """O = softmax(q k^T * scale) v and the row log-sum-exp, online over key tiles, with S
    and O in accumulator fragments."""
    p = dict(spec.params)
    outs_decl = [(n, p["out_dtype"] if n == "o" else "f32") for n in p["outputs"]]
    K = _Kernel(spec, caps, cfg, "attention_fwd", ("q", "k", "v"), outs_decl, registers=True)
    kb, c, t, hd, h, bl, scale = K.kb, K.c, p["t"], p["hd"], p["h"], cfg.block, p["scale"]
    n_e, classes = rm.length, rm.classes
    L, rows, cols, cls_of = _lane_places(K, rm)  # rows: the lane's query rows
    q, k, v = K.ins["q"], K.ins["k"], K.ins["v"]
    hk = c.head / (h // p["hkv"]) if h != p["hkv"] else c.head
    qf = K.own_fragments("q", q.base(c.bi, c.head))
    m_var = [kb.var("f32", _NEG_INF) for _ in classes]
    shift_var = [kb.var("f32", 0.0) for _ in classes]
    l_var = [kb.var("f32", 0.0) for _ in classes]  # the lane's part of the row sum
    o = [K.fc.var() for _ in range(hd // _F)]

    own_end, kv, walk_end = K.kv_walk(k.base(c.bi, hk), v.base(c.bi, hk))

    def body(j0: Value, masked: bool) -> None:
        K.kv_next(kv, j0, walk_end)
        s = []  # s[n][e]: the lane's scaled scores of key block n
        for n in range(bl // _F):
            xs = [x * scale for x in elements(K.fc, K.product(qf, 0, n * _F, True), n_e)]
            if masked:
                xs = [kb.select(A._allowed(c, j0 + n * _F + cols[e], rows[cls_of[e]]), x,
                                _NEG_INF) for e, x in enumerate(xs)]
            s.append(xs)
        shift, corr = [], []
        for ci, es in enumerate(classes):
            mine = reduce(lambda a, b: nan_minmax(kb, "max", a, b),
                          [s[n][e] for n in range(len(s)) for e in es])
            tile_max = L.reduce(lambda a, b: nan_minmax(kb, "max", a, b), mine)
            m_old = m_var[ci].get()
            m_new = nan_minmax(kb, "max", m_old, tile_max)
            # as the SIMT kernel: an infinite max shifts by 0; nothing seen yet rescales by 0
            sh = kb.select(A._is_inf(kb, m_new), kb.f32(0.0), m_new)
            corr.append(kb.select(kb.bitcast(m_old, "u32") == 0xFF800000, kb.f32(0.0),
                                  kb.exp(shift_var[ci].get() - sh)))
            shift.append(sh)
            m_var[ci].set(m_new)
        ps = [[kb.exp(x - shift[cls_of[e]]) for e, x in enumerate(xs)] for xs in s]
        for ci, es in enumerate(classes):
            l_var[ci].set(reduce(_ADD, [ps[n][e] for n in range(len(ps)) for e in es],
                                 l_var[ci].get() * corr[ci]))
            shift_var[ci].set(shift[ci])
        pa = []
        for n, xs in enumerate(ps):
            keeps = [c.keep(c.head, rows[cls_of[e]], j0 + n * _F + cols[e]) for e in range(n_e)]
            pa.append(_pack(K, [x if kp is None else x * kp
                                    for x, kp in zip(xs, keeps, strict=True)]))
        corr_e = [corr[cls_of[e]] for e in range(n_e)]
        for d in range(hd // _F):
            scaled = from_elements(K.fc, [x * f for x, f in zip(
                elements(K.fc, o[d].get(), n_e), corr_e, strict=True)])
            o[d].set(K.product(pa, 1, d * _F, False, scaled))

    m_lo, m_hi, f_lo, f_hi = A._masked_ranges(c, own_end)
    A._loop_tiles(c, f_lo, f_hi, lambda j0: body(j0, False), t)
    A._loop_tiles(c, m_lo, m_hi, lambda j0: body(j0, True), cfg.rows)  # diagonal or tail
    lsum = [L.reduce(_ADD, lv.get()) for lv in l_var]
    if "o" in K.outs:
        final = [from_elements(K.fc, [ieee_div(kb, x, lsum[cls_of[e]]) for e, x in enumerate(
            elements(K.fc, od.get(), n_e))]) for od in o]
        K.write_out(final, K.outs["o"], h, c.head, 1.0)
    if "lse" in K.outs:
        log = ScalarEmitter(kb)
        for ci in range(len(classes)):
            with kb.if_(L.leader & (rows[ci] < t)):
                K.outs["lse"].store((c.bi * h + c.head) * t + rows[ci],
                                    log.unary("log", lsum[ci]) + shift_var[ci].get())
    flops = 4 * p["b"] * h * t * t * hd // (2 if p["causal"] else 1)
    return K.binary(spec, caps, h, flops, "fwd registers")


def generate_dq(spec: KernelSpec, caps: object, cfg: CmConfig, rm: RowMap) -> KernelBinary:
    """dq = scale * dS k over key tiles, dS = P (dP - D), P = exp(S - lse), with S, dP and
    dS in the lanes' fragment elements."""
    p = dict(spec.params)
    K = _Kernel(spec, caps, cfg, "attention_dq", A._BWD_INPUTS, [("dq", "f32")], registers=True)
    kb, c, t, hd, h, bl = K.kb, K.c, p["t"], p["hd"], p["h"], cfg.block
    n_e = rm.length
    _, rows, cols, cls_of = _lane_places(K, rm)  # rows: the lane's query rows
    k, v = K.ins["k"], K.ins["v"]
    hk = c.head / (h // p["hkv"]) if h != p["hkv"] else c.head
    qf = K.own_fragments("q", K.ins["q"].base(c.bi, c.head))
    dof = K.own_fragments("do", K.ins["do"].base(c.bi, c.head))
    lse_base = K.ins["lse"].base(c.bi, c.head)
    lse = [K.ins["lse"].at(lse_base, kb.fmin(r, t - 1)) for r in rows]
    dd = [K.row_d(kb.fmin(r, t - 1)) for r in rows]
    acc = [K.fc.var() for _ in range(hd // _F)]

    own_end, kv, walk_end = K.kv_walk(k.base(c.bi, hk), v.base(c.bi, hk))

    def body(j0: Value, masked: bool) -> None:
        K.kv_next(kv, j0, walk_end)
        da = []
        for n in range(bl // _F):
            xs = elements(K.fc, K.product(qf, 0, n * _F, True), n_e)
            dps = elements(K.fc, K.product(dof, 1, n * _F, True), n_e)
            ds = []
            for e, (x, dp) in enumerate(zip(xs, dps, strict=True)):
                ci, key = cls_of[e], j0 + n * _F + cols[e]
                ds.append(K.dq_element(rows[ci], key, x, dp, lse[ci], dd[ci], masked))
            da.append(_pack(K, ds))
        K.add_dq(da, acc)

    return K.finish_dq(spec, caps, body, own_end, acc, "dq registers")


def generate_dkdv(spec: KernelSpec, caps: object, cfg: CmConfig, rm: RowMap) -> KernelBinary:
    """dv = P^T dO and dk = scale * dS^T q over every query head of the kv head and query
    tile, for the subgroup's 16 keys: S^T = k q^T and dP^T = v dO^T are accumulators whose
    rows are keys, so P^T and dS^T are A operands without a transpose."""
    p = dict(spec.params)
    K = _Kernel(spec, caps, cfg, "attention_dkdv", A._BWD_INPUTS,
                [(n, "f32") for n in p["outputs"]], registers=True)
    kb, c, hd, bl = K.kb, K.c, p["hd"], cfg.block
    n_e = rm.length
    _, keys, cols, cls_of = _lane_places(K, rm)  # keys: the lane's key rows
    kf = K.own_fragments("k", K.ins["k"].base(c.bi, c.head))
    vf = K.own_fragments("v", K.ins["v"].base(c.bi, c.head))
    lse_sh, dd_sh = kb.shared("f32", bl), kb.shared("f32", bl)
    part_sh = kb.shared("f32", bl * (hd // 8))
    dk = [K.fc.var() for _ in range(hd // _F)]
    dv = [K.fc.var() for _ in range(hd // _F)]

    def body(hh: Value, i0: Value, masked: bool) -> None:
        K.stage_queries(hh, i0, lse_sh, dd_sh, part_sh)
        pa, sa = [], []
        for n in range(bl // _F):
            xs = elements(K.fc, K.product(kf, 0, n * _F, True), n_e)
            dps = elements(K.fc, K.product(vf, 1, n * _F, True), n_e)
            pd, ds = [], []
            for e, (x, dp) in enumerate(zip(xs, dps, strict=True)):
                col = cols[e] + n * _F
                ii, j = i0 + col, keys[cls_of[e]]
                pr, d = K.dkdv_element(hh, ii, j, col, x, dp, lse_sh, dd_sh, masked)
                pd.append(pr)
                ds.append(d)
            pa.append(_pack(K, pd))
            sa.append(_pack(K, ds))
        K.add_dkdv(pa, sa, dk, dv)

    A._query_tiles(c, body)
    return K.finish_dkdv(spec, caps, dk, dv, "dkdv registers")


_GENERATORS = {"attention_fwd": generate_fwd, "attention_dq": generate_dq,
               "attention_dkdv": generate_dkdv}


def generate(spec: KernelSpec, caps: object, cfg: CmConfig | None = None
             ) -> KernelBinary | None:
    """The register-softmax kernel for an attention spec (tiling cfg, or the one `choose`
    gives it), or None where the tensor-core variants do not apply or the device's fragment
    layout does not allow this one."""
    p = dict(spec.params)
    elem = _ELEM.get(p["q"][0])
    rm = register_softmax_map(caps, elem) if elem is not None else None
    if rm is None:
        return None
    cfg = cfg if cfg is not None else choose(spec.family, p, caps, registers=True)
    if cfg is None or cfg.lanes != rm.lanes:
        return None
    return _GENERATORS[spec.family](spec, caps, cfg, rm)
