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
    """(Lanes, rows[rb][ci]: the row of the lane's element class ci in the subgroup's row
    block rb, each element's column, each element's class)."""
    L = Lanes(K.kb, rm, K.lane)
    rows = [[K.block_row0(rb) + L.row(ci) for ci in range(len(rm.classes))]
            for rb in range(K.cfg.row_blocks)]
    cols = [L.col(e) for e in range(rm.length)]
    return L, rows, cols, [rm.cls(e) for e in range(rm.length)]


class _OnlineSoftmax:
    """One 16-row block's state in the forward: per element class, the running row maximum,
    the shift its exps were taken at and the lane's part of the row sum; O in accumulators."""

    def __init__(self, K: _Kernel, rm: RowMap, rows: list[Value]):
        kb = K.kb
        self.K, self.rm, self.rows = K, rm, rows
        self.m = [kb.var("f32", _NEG_INF) for _ in rm.classes]
        self.shift = [kb.var("f32", 0.0) for _ in rm.classes]
        self.lsum = [kb.var("f32", 0.0) for _ in rm.classes]
        self.o = [K.fc.var() for _ in range(K.hd // _F)]

    def step(self, L: Lanes, prods: list[coopmat.Fragment], j0: Value, cols: list, cls_of: list,
             masked: bool) -> tuple[list[coopmat.Fragment], list[coopmat.Fragment]]:
        """One key tile's S (prods[n]: key block n): the maxima, sums and shift updated; returns
        P as A fragments and O rescaled by the change of shift (what P v adds to)."""
        K, kb, c, p, n_e = self.K, self.K.kb, self.K.c, self.K.p, self.rm.length
        s = []  # s[n][e]: the lane's scaled scores of key block n
        for n, prod in enumerate(prods):
            xs = [x * p["scale"] for x in elements(K.fc, prod, n_e)]
            if masked:
                xs = [kb.select(A._allowed(c, j0 + n * _F + cols[e], self.rows[cls_of[e]]), x,
                                _NEG_INF) for e, x in enumerate(xs)]
            s.append(xs)
        shift, corr = [], []
        for ci, es in enumerate(self.rm.classes):
            mine = reduce(lambda a, b: nan_minmax(kb, "max", a, b),
                          [s[n][e] for n in range(len(s)) for e in es])
            tile_max = L.reduce(lambda a, b: nan_minmax(kb, "max", a, b), mine)
            m_old = self.m[ci].get()
            m_new = nan_minmax(kb, "max", m_old, tile_max)
            # as the SIMT kernel: an infinite max shifts by 0; nothing seen yet rescales by 0
            sh = kb.select(A._is_inf(kb, m_new), kb.f32(0.0), m_new)
            corr.append(kb.select(kb.bitcast(m_old, "u32") == 0xFF800000, kb.f32(0.0),
                                  kb.exp(self.shift[ci].get() - sh)))
            shift.append(sh)
            self.m[ci].set(m_new)
        ps = [[kb.exp(x - shift[cls_of[e]]) for e, x in enumerate(xs)] for xs in s]
        for ci, es in enumerate(self.rm.classes):
            self.lsum[ci].set(reduce(_ADD, [ps[n][e] for n in range(len(ps)) for e in es],
                                     self.lsum[ci].get() * corr[ci]))
            self.shift[ci].set(shift[ci])
        pa = []
        for n, xs in enumerate(ps):
            keeps = [c.keep(c.head, self.rows[cls_of[e]], j0 + n * _F + cols[e])
                     for e in range(n_e)]
            pa.append(_pack(K, [x if kp is None else x * kp
                                for x, kp in zip(xs, keeps, strict=True)]))
        corr_e = [corr[cls_of[e]] for e in range(n_e)]
        scaled = [from_elements(K.fc, [x * f for x, f in zip(
            elements(K.fc, od.get(), n_e), corr_e, strict=True)]) for od in self.o]
        return pa, scaled


def generate_fwd(spec: KernelSpec, caps: object, cfg: CmConfig, rm: RowMap) -> KernelBinary:
    """O = softmax(q k^T * scale) v and the row log-sum-exp, online over key tiles, with S
    and O in accumulator fragments; each of the subgroup's row blocks keeps its own softmax
    state and shares the streamed tile's B fragments with the others."""
    p = dict(spec.params)
    outs_decl = [(n, p["out_dtype"] if n == "o" else "f32") for n in p["outputs"]]
    K = _Kernel(spec, caps, cfg, "attention_fwd", ("q", "k", "v"), outs_decl, registers=True)
    kb, c, t, hd, h, bl = K.kb, K.c, p["t"], p["hd"], p["h"], cfg.block
    n_e, nrb = rm.length, cfg.row_blocks
    L, rows, cols, cls_of = _lane_places(K, rm)  # rows[rb]: the lane's query rows
    q, k, v = K.ins["q"], K.ins["k"], K.ins["v"]
    hk = c.head / (h // p["hkv"]) if h != p["hkv"] else c.head
    qf = [K.own_fragments("q", q.base(c.bi, c.head), rb) for rb in range(nrb)]
    st = [_OnlineSoftmax(K, rm, rows[rb]) for rb in range(nrb)]

    own_end, kv, walk_end = K.kv_walk(k.base(c.bi, hk), v.base(c.bi, hk))

    def body(j0: Value, masked: bool) -> None:
        K.kv_next(kv, j0, walk_end)
        prods = [K.products(qf, 0, n * _F, True) for n in range(bl // _F)]  # [n][rb]
        steps = [st[rb].step(L, [pr[rb] for pr in prods], j0, cols, cls_of, masked)
                 for rb in range(nrb)]
        for d in range(hd // _F):
            outs = K.products([pa for pa, _ in steps], 1, d * _F, False,
                              [scaled[d] for _, scaled in steps])
            for sm, x in zip(st, outs, strict=True):
                sm.o[d].set(x)

    m_lo, m_hi, f_lo, f_hi = A._masked_ranges(c, own_end)
    A._loop_tiles(c, f_lo, f_hi, lambda j0: body(j0, False), t)
    A._loop_tiles(c, m_lo, m_hi, lambda j0: body(j0, True), cfg.rows)  # diagonal or tail
    log = ScalarEmitter(kb)
    for rb, sm in enumerate(st):
        lsum = [L.reduce(_ADD, lv.get()) for lv in sm.lsum]
        if "o" in K.outs:
            if rb:
                coopmat.subgroup_barrier(kb)  # the scratch read before it is rewritten
            final = [from_elements(K.fc, [ieee_div(kb, x, lsum[cls_of[e]]) for e, x in
                                          enumerate(elements(K.fc, od.get(), n_e))])
                     for od in sm.o]
            K.write_out(final, K.outs["o"], h, c.head, 1.0, rb)
        if "lse" in K.outs:
            for ci in range(len(rm.classes)):
                with kb.if_(L.leader & (rows[rb][ci] < t)):
                    K.outs["lse"].store((c.bi * h + c.head) * t + rows[rb][ci],
                                        log.unary("log", lsum[ci]) + sm.shift[ci].get())
    flops = 4 * p["b"] * h * t * t * hd // (2 if p["causal"] else 1)
    return K.binary(spec, caps, h, flops, "fwd registers")


def generate_dq(spec: KernelSpec, caps: object, cfg: CmConfig, rm: RowMap) -> KernelBinary:
    """dq = scale * dS k over key tiles, dS = P (dP - D), P = exp(S - lse), with S, dP and
    dS in the lanes' fragment elements; the subgroup's row blocks share each B fragment."""
    p = dict(spec.params)
    K = _Kernel(spec, caps, cfg, "attention_dq", A._BWD_INPUTS, [("dq", "f32")], registers=True)
    kb, c, t, hd, h, bl = K.kb, K.c, p["t"], p["hd"], p["h"], cfg.block
    n_e, nrb = rm.length, cfg.row_blocks
    _, rows, cols, cls_of = _lane_places(K, rm)  # rows[rb]: the lane's query rows
    k, v = K.ins["k"], K.ins["v"]
    hk = c.head / (h // p["hkv"]) if h != p["hkv"] else c.head
    qf = [K.own_fragments("q", K.ins["q"].base(c.bi, c.head), rb) for rb in range(nrb)]
    dof = [K.own_fragments("do", K.ins["do"].base(c.bi, c.head), rb) for rb in range(nrb)]
    lse_base = K.ins["lse"].base(c.bi, c.head)
    lse = [[K.ins["lse"].at(lse_base, kb.fmin(r, t - 1)) for r in rr] for rr in rows]
    dd = [[K.row_d(kb.fmin(r, t - 1)) for r in rr] for rr in rows]
    acc = [[K.fc.var() for _ in range(hd // _F)] for _ in range(nrb)]

    own_end, kv, walk_end = K.kv_walk(k.base(c.bi, hk), v.base(c.bi, hk))

    def body(j0: Value, masked: bool) -> None:
        K.kv_next(kv, j0, walk_end)
        da: list[list] = [[] for _ in range(nrb)]
        for n in range(bl // _F):
            ss = K.products(qf, 0, n * _F, True)
            dps = K.products(dof, 1, n * _F, True)
            for rb in range(nrb):
                ds = []
                for e, (x, dp) in enumerate(zip(elements(K.fc, ss[rb], n_e),
                                                elements(K.fc, dps[rb], n_e), strict=True)):
                    ci, key = cls_of[e], j0 + n * _F + cols[e]
                    ds.append(K.dq_element(rows[rb][ci], key, x, dp, lse[rb][ci], dd[rb][ci],
                                           masked))
                da[rb].append(_pack(K, ds))
        K.add_dq(da if nrb > 1 else da[0], acc if nrb > 1 else acc[0])

    return K.finish_dq(spec, caps, body, own_end, acc if nrb > 1 else acc[0], "dq registers")


def generate_dkdv(spec: KernelSpec, caps: object, cfg: CmConfig, rm: RowMap) -> KernelBinary:
    """dv = P^T dO and dk = scale * dS^T q over every query head of the kv head and query
    tile, for the subgroup's 16 keys: S^T = k q^T and dP^T = v dO^T are accumulators whose
    rows are keys, so P^T and dS^T are A operands without a transpose."""
    p = dict(spec.params)
    K = _Kernel(spec, caps, cfg, "attention_dkdv", A._BWD_INPUTS,
                [(n, "f32") for n in p["outputs"]], registers=True)
    kb, c, hd, bl = K.kb, K.c, p["hd"], cfg.block
    n_e = rm.length
    _, (keys,), cols, cls_of = _lane_places(K, rm)  # keys: the lane's key rows (one block)
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
    if cfg is None or cfg.lanes != rm.lanes \
            or (cfg.row_blocks > 1 and spec.family == "attention_dkdv"):
        return None  # dk/dv's dk and dv accumulators leave no registers for a second block
    return _GENERATORS[spec.family](spec, caps, cfg, rm)
