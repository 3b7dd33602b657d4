"""Flash attention kernel families: fused forward (online softmax) and fused backward.

Why: unfused attention materialises [B, H, T, T] scores and probabilities in forward and again
in backward; these kernels stream keys (forward, dq) or queries (dk/dv) through shared memory in
small tiles and never hold more than one tile of scores, so memory grows with T, not T^2.
Portable SIMT on every device; where the device has cooperative matrices and the operands are
16-bit, attention_coopmat.py's tensor-core variant replaces these kernels (`FAST_VARIANTS`).

Shape of the work. One invocation owns one row: a query row (forward, dq) or a key row (dk/dv);
a workgroup owns `rows` consecutive rows of one (batch, head) and walks tiles of `block` keys
(or queries) staged in shared memory, each row's vectors (q, dO, accumulators) held in registers
(head dim unrolled). Causal tiles entirely below the diagonal run a mask-free body; tiles that
touch the diagonal or the ragged end of T run a masked body, in which a masked position adds
exactly nothing (selects, not 0 * x: a NaN in v at a position a row may not see stays out of it).
Nothing depends on the subgroup size.

Specs (families "attention_fwd", "attention_dq", "attention_dkdv"), params as (key, value):
    ("b", B), ("h", H), ("hkv", Hkv), ("t", T), ("hd", hd), ("causal", bool), ("scale", float),
    ("q" | "k" | "v" | "o" | "do", (dtype, offset, (sb, sh, st, sd))), ("lse", (...(sb, sh, st)))
    optional ("dropout", p), ("seed", s), ("salt", n), ("ctr", offset): dropout with the
    counter-based mask of `rand_uniform` (an i32 counter binding after the inputs)
    fwd:  ("out_dtype", dtype), ("outputs", subset of ("o", "lse"))   reads q, k, v
    dq:   reads q, k, v, o, lse, do; writes dq f32
    dkdv: ("outputs", subset of ("dk", "dv")); reads q, k, v, o, lse, do; writes f32
    optional ("out_layout", "bthd"): o / dq / dk / dv are stored as [B, T, heads, hd] (the
    layout the model's head transpose and reshape read for free), else as [B, heads, T, hd].
lse is [B, H, T]. Push constants
(base_x, base_y, base_z) offset the workgroup ids when the grid is split for device limits.

Grid: (row blocks, heads, batch), or for a causal forward and dq (heads, batch, row blocks)
with the last query blocks, whose walks are longest, first: devices start workgroups in id
order, so short walks fill the last wave's tail (FlashAttention-2 reverses its query blocks for
the same reason); `_grid_order` has the measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce

from ..dsl import KernelBuilder, Value, cap, pack_push_constants
from ..kernel import Dispatch, KernelBinary, KernelSpec
from ..lower import register_kernel_lowering
from ..scalar import ScalarEmitter, ieee_div, nan_minmax
from ..views import View
from .elementwise import storage_dtype
from .matmul import coopmat_allowed, grid_plan

FAMILIES = {"attention_fwd": "generate_attention_fwd", "attention_dq": "generate_attention_dq",
            "attention_dkdv": "generate_attention_dkdv"}
_U32 = 1 << 32
_NEG_INF = float("-inf")
# unrolled multiply-adds per row and tile (block * hd): bounds module size and registers
_FWD_WORK, _BWD_WORK = 512, 256


@dataclass(frozen=True)
class AttnConfig:
    rows: int  # invocations per workgroup = rows it owns
    block: int  # keys (forward, dq) or queries (dk/dv) per shared tile; divides rows


def choose_config(t: int, hd: int, caps: object, work: int) -> AttnConfig:
    limit = min(int(cap(caps, "max_workgroup_invocations", 1024)), 64)  # type: ignore
    rows = max(8, min(limit, 1 << max(0, t - 1).bit_length()))
    if cap(caps, "device_type", None) == "cpu":
        # llvmpipe compiles a module at its first dispatch, in time that grows faster than its
        # size: one key per tile keeps the module a tenth as big (the first GPT step on 2
        # cores took 100 s with 16-key tiles)
        work = min(work, hd)
    block = max(1, min(rows, 1 << max(0, (work // hd).bit_length() - 1)))
    return AttnConfig(rows, block)


def _u(kb: KernelBuilder, x: int) -> Value:
    return kb.u32(x % _U32)  # u32 arithmetic wraps: a negative stride still lands exactly


class _Operand:
    """A strided [B, heads, T(, hd)] input: binding plus address arithmetic."""

    def __init__(self, kb: KernelBuilder, name: str, entry: tuple):
        dt, off, strides = entry
        self.kb, self.strides, self.off = kb, tuple(strides), off
        self.buf = kb.buffer(name, storage_dtype(dt), writable=False)

    def base(self, b: Value, h: Value) -> Value:
        kb, (sb, sh) = self.kb, self.strides[:2]
        return _u(kb, self.off) + b * _u(kb, sb) + h * _u(kb, sh)

    def at(self, base: Value, t: Value, d: int | Value | None = None) -> Value:
        kb = self.kb
        idx = base + t * _u(kb, self.strides[2])
        if d is not None:
            idx = idx + (_u(kb, d * self.strides[3]) if isinstance(d, int) else
                         d * _u(kb, self.strides[3]))
        return self.buf.load(idx)


@dataclass
class _Ctx:
    """What every family's prologue sets up."""

    kb: KernelBuilder
    p: dict
    cfg: AttnConfig
    tid: Value
    blk0: Value  # first row of this workgroup
    head: Value  # query head (fwd, dq) or kv head (dk/dv)
    bi: Value
    ctr: Value | None = None  # the dropout RNG's counter (None: no dropout)
    order: str = "fastest"  # the grid's block order (`_grid_order`)

    def keep(self, head: Value, i: Value, j: Value) -> Value | None:
        """Dropout's factor for query row i, key j of query head `head`: 1/(1-p) or 0, from
        the hash `rand_uniform` applies to the unfused [B, H, T, T] element's linear index;
        None without dropout."""
        if self.ctr is None:
            return None
        from alpha_jit.ir.ops import registry

        p, kb, t = self.p, self.kb, self.p["t"]
        lin = ((self.bi * p["h"] + head) * t + i) * t + j
        u = registry.scalar_rule("rand_uniform", ScalarEmitter(kb),
                                 {"seed": p["seed"], "salt": p["salt"]},
                                 [self.ctr, kb.cast(lin, "i32")])
        return kb.select(u >= float(p["dropout"]), kb.f32(1.0 / (1.0 - p["dropout"])),
                         kb.f32(0.0))


def _grid_order(family: str, p: dict) -> str:
    """How workgroup ids map to row blocks: "fastest" (x = block, ascending), "slowest"
    (z = block, ascending) or "slowest reversed" (z = block, the last first). A causal forward
    and dq, whose last query blocks walk longest, take "slowest reversed": on the H200
    (`gpt2`, T 1024, 32-key tiles) 204 -> 177 us and 202 -> 177 us per kernel, `small` (T 256,
    64-key tiles) within 2%; reversing the blocks along x did nothing, and dk/dv (whose first
    key blocks walk longest) was slower on the slowest axis, 260 -> 281 us (session 10)."""
    return "slowest reversed" if p["causal"] and family != "attention_dkdv" else "fastest"


def _prologue(spec: KernelSpec, caps: object, cfg: AttnConfig, inputs: tuple[str, ...],
              outputs: list[tuple[str, str]], threads: int | None = None,
              setup: Callable[[KernelBuilder], None] | None = None
              ) -> tuple[_Ctx, dict, dict]:
    """Bindings (inputs, the dropout counter, outputs), push constants and the workgroup's
    place; `threads` per workgroup (default: one per row); `setup(kb)` before anything is
    emitted."""
    p = dict(spec.params)
    kb = KernelBuilder(spec.name, threads or cfg.rows, caps)
    if setup is not None:
        setup(kb)
    ins = {n: _Operand(kb, n, p[n]) for n in inputs}
    drop = None
    if p.get("dropout", 0.0) > 0:  # the RNG counter binding, then the outputs
        drop = kb.buffer("ctr", "i32", writable=False).load(kb.u32(int(p["ctr"])))
    outs = {n: kb.buffer(n, storage_dtype(dt), writable=True) for n, dt in outputs}
    pc = kb.push_constants([("base_x", "u32"), ("base_y", "u32"), ("base_z", "u32")])
    wid = [kb.workgroup_id(a) + pc[f"base_{x}"] for a, x in enumerate("xyz")]
    order = _grid_order(spec.family, p)
    blk, head, bi = (wid[2], wid[0], wid[1]) if order.startswith("slowest") else wid
    if order.endswith("reversed"):
        blk = (math.ceil(p["t"] / cfg.rows) - 1) - blk
    ctx = _Ctx(kb, p, cfg, kb.local_index(), blk * cfg.rows, head, bi, drop, order)
    return ctx, ins, outs


def _out_base(c: _Ctx, heads: int, head: Value, i: Value) -> Value:
    """Element index of (batch, head, row i, 0) in an o / dq / dk / dv output."""
    t, hd = c.p["t"], c.p["hd"]
    if c.p.get("out_layout") == "bthd":
        return ((c.bi * t + i) * heads + head) * hd
    return ((c.bi * heads + head) * t + i) * hd


def _dot(kb: KernelBuilder, xs: list[Value], load: Callable[[int], Value]) -> Value:
    acc = xs[0] * load(0)
    for d in range(1, len(xs)):
        acc = kb.fma(xs[d], load(d), acc)
    return acc


def _load_tiles(c: _Ctx, j0: Value, tiles: list[tuple], masked: bool) -> None:
    """Stage rows j0 .. j0+block of each (operand, base, shared array) tile; rows past T are
    zero (and masked) in a masked tile."""
    kb, t, hd, rows, blk = c.kb, c.p["t"], c.p["hd"], c.cfg.rows, c.cfg.block
    for r in range(math.ceil(blk * hd / rows)):
        e = c.tid + r * rows
        jj, d = (e / hd, e % hd) if hd > 1 else (e, kb.u32(0))
        j = j0 + jj
        guard = e < blk * hd if (r + 1) * rows > blk * hd else None
        jc = kb.fmin(j, t - 1) if masked else j
        vals = [op.at(base, jc, d) for op, base, _ in tiles]
        if masked:
            vals = [kb.select(j < t, v, 0.0) for v in vals]
        for (_, _, sh), v in zip(tiles, vals, strict=True):
            if guard is None:
                sh.store(e, v)
            else:
                with kb.if_(guard):
                    sh.store(e, v)


def _masked_ranges(c: _Ctx, own_end: Callable[[], Value] | None
                   ) -> tuple[Value | int, Value | int, Value | int, Value | int]:
    """Tile ranges as (masked_lo, masked_hi, full_lo, full_hi) for a row block whose causal
    diagonal tiles are [blk0, own_end) (None: not causal, only the ragged tail is masked)."""
    kb, t, blk = c.kb, c.p["t"], c.cfg.block
    if own_end is None:
        full = (t // blk) * blk
        return full, t, 0, full
    return c.blk0, own_end(), kb.u32(0), c.blk0


def _loop_tiles(c: _Ctx, lo: Value | int, hi: Value | int, body: Callable[[Value], None],
                span: int) -> None:
    """body(j0) for the tiles of [lo, hi), at most `span` rows apart (llvmpipe's loop bound)."""
    kb = c.kb
    with kb.loop(kb.value(lo, "u32"), kb.value(hi, "u32"), c.cfg.block,
                 max_trips=math.ceil(span / c.cfg.block)) as j0:
        body(j0)


def _grid(c: _Ctx, heads: int, caps: object) -> list[Dispatch]:
    blocks = math.ceil(c.p["t"] / c.cfg.rows)
    slowest = c.order.startswith("slowest")
    groups = (heads, c.p["b"], blocks) if slowest else (blocks, heads, c.p["b"])
    return [Dispatch(cnt, pack_push_constants([("u32", v) for v in base]))
            for cnt, base in grid_plan(groups, caps)]


def _allowed(c: _Ctx, key: Value, query: Value) -> Value:
    """May `query` see `key` (inside T, and not in its future when causal)."""
    ok = key < c.p["t"]
    return ok & (key <= query) if c.p["causal"] else ok


def _is_inf(kb: KernelBuilder, x: Value) -> Value:
    # on the bits: a driver may fold OpIsInf away when it assumes no infinities
    return (kb.bitcast(x, "u32") & 0x7FFFFFFF) == 0x7F800000


def generate_attention_fwd(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """O = softmax(q k^T * scale) v with an online softmax over key tiles; also the per-row
    log-sum-exp (shift + log l) that backward recomputes the probabilities from."""
    p = dict(spec.params)
    fast = _fast_variant(spec, caps)
    if fast is not None:
        return fast
    outputs = p["outputs"]
    outs_decl = [(n, p["out_dtype"] if n == "o" else "f32") for n in outputs]
    cfg = choose_config(p["t"], p["hd"], caps, _FWD_WORK)
    c, ins, outs = _prologue(spec, caps, cfg, ("q", "k", "v"), outs_decl)
    kb, t, hd, h, blk = c.kb, p["t"], p["hd"], p["h"], c.cfg.block
    q, k, v = ins["q"], ins["k"], ins["v"]
    hk = c.head / (h // p["hkv"]) if h != p["hkv"] else c.head
    i = c.blk0 + c.tid
    qb = q.base(c.bi, c.head)
    qv = [q.at(qb, kb.fmin(i, t - 1), d) * p["scale"] for d in range(hd)]
    kbase, vbase = k.base(c.bi, hk), v.base(c.bi, hk)
    k_sh, v_sh = kb.shared("f32", blk * hd), kb.shared("f32", blk * hd)
    acc = [kb.var("f32", 0.0) for _ in range(hd)]
    l_var, m_var, shift_var = kb.var("f32", 0.0), kb.var("f32", _NEG_INF), kb.var("f32", 0.0)

    def body(j0: Value, masked: bool) -> None:
        kb.barrier()  # the previous tile's readers are done
        _load_tiles(c, j0, [(k, kbase, k_sh), (v, vbase, v_sh)], masked)
        kb.barrier()
        s = [_dot(kb, qv, lambda d, j=j: k_sh.load(j * hd + d)) for j in range(blk)]
        oks = [_allowed(c, j0 + j, i) for j in range(blk)] if masked else []
        if masked:
            s = [kb.select(ok, sj, _NEG_INF) for ok, sj in zip(oks, s, strict=True)]
        m_new = nan_minmax(kb, "max", m_var.get(), reduce(
            lambda a, b: nan_minmax(kb, "max", a, b), s))
        # an infinite max shifts by 0 (as the logsumexp reduction does): exp never sees
        # -inf - -inf; NaN stays NaN
        shift = kb.select(_is_inf(kb, m_new), kb.f32(0.0), m_new)
        # nothing seen yet (max -inf): l and acc are 0, and exp(0 - shift) may overflow
        m_old = m_var.get()
        corr = kb.select(kb.bitcast(m_old, "u32") == 0xFF800000, kb.f32(0.0),
                         kb.exp(shift_var.get() - shift))
        ps = [kb.exp(sj - shift) for sj in s]
        l_var.set(reduce(lambda a, b: a + b, ps, l_var.get() * corr))
        keeps = [c.keep(c.head, i, j0 + j) for j in range(blk)]
        ps = [pj if kj is None else pj * kj for pj, kj in zip(ps, keeps, strict=True)]
        for d in range(hd):
            a = acc[d].get() * corr
            for j in range(blk):
                vv = v_sh.load(j * hd + d)
                a = kb.fma(ps[j], kb.select(oks[j], vv, 0.0) if masked else vv, a)
            acc[d].set(a)
        m_var.set(m_new)
        shift_var.set(shift)

    own_end = (lambda: kb.fmin(c.blk0 + c.cfg.rows, kb.u32(t))) if p["causal"] else None
    m_lo, m_hi, f_lo, f_hi = _masked_ranges(c, own_end)
    _loop_tiles(c, f_lo, f_hi, lambda j0: body(j0, False), t)
    _loop_tiles(c, m_lo, m_hi, lambda j0: body(j0, True), c.cfg.rows)  # diagonal or tail
    lv = l_var.get()
    row = (c.bi * h + c.head) * t + i
    with kb.if_(i < t):
        if "o" in outs:
            ob = _out_base(c, h, c.head, i)
            for d in range(hd):
                outs["o"].store(ob + d, ieee_div(kb, acc[d].get(), lv))
        if "lse" in outs:
            outs["lse"].store(row, ScalarEmitter(kb).unary("log", lv) + shift_var.get())
    dispatches = _grid(c, h, caps)
    flops = 4 * p["b"] * h * t * t * hd // (2 if p["causal"] else 1)
    return kb.binary(spec, dispatches, notes={
        "flops": flops, "variant": f"simt flash rows {c.cfg.rows} tile {blk}"})


def _bwd_row_stats(c: _Ctx, ins: dict, row_t: Value, head: Value) -> tuple[Value, Value]:
    """(lse, D = dO . O) of query row `row_t` (clamped by the caller) of `head`."""
    kb, hd = c.kb, c.p["hd"]
    ob, dob = ins["o"].base(c.bi, head), ins["do"].base(c.bi, head)
    dd = _dot(kb, [ins["do"].at(dob, row_t, d) for d in range(hd)],
              lambda d: ins["o"].at(ob, row_t, d))
    lse = ins["lse"].at(ins["lse"].base(c.bi, head), row_t)
    return lse, dd


def _stage_row_stats(c: _Ctx, ins: dict, hh: Value, i0: Value, lse_sh: object,
                     dd_sh: object) -> None:
    """lse and D of query rows i0 .. i0 + block of head hh into shared arrays (0 past T),
    one row per invocation of the first `block` (the caller puts barriers around it)."""
    kb, t, blk = c.kb, c.p["t"], c.cfg.block
    with kb.if_(c.tid < blk):
        ii = i0 + c.tid
        lse, dd = _bwd_row_stats(c, ins, kb.fmin(ii, t - 1), hh)
        inside = ii < t
        lse_sh.store(c.tid, kb.select(inside, lse, 0.0))  # type: ignore[attr-defined]
        dd_sh.store(c.tid, kb.select(inside, dd, 0.0))  # type: ignore[attr-defined]


def _query_tiles(c: _Ctx, body: Callable[[Value, Value, bool], None]) -> None:
    """dk/dv's walk: body(query head, first query row, masked) over every query head of the
    kv head and every query tile a key block may be seen from. The causal diagonal
    [blk0, blk0 + rows) and the ragged tail are masked (one loop over both, numbered n1
    then n3), the rest mask-free."""
    kb, t, blk, rep = c.kb, c.p["t"], c.cfg.block, c.p["h"] // c.p["hkv"]
    if c.p["causal"]:
        d_end = kb.fmin(c.blk0 + c.cfg.rows, kb.u32(t))
        f_lo = d_end
        f_hi = d_end + ((kb.u32(t) - d_end) / blk) * blk
        diag_lo, n1 = c.blk0, (d_end - c.blk0 + (blk - 1)) / blk
    else:
        f_lo, f_hi = kb.u32(0), kb.u32((t // blk) * blk)
        diag_lo, n1 = kb.u32(0), kb.u32(0)
    n3 = (kb.u32(t) - f_hi + (blk - 1)) / blk
    tiles = math.ceil(t / blk)
    masked = min(tiles, math.ceil(c.cfg.rows / blk) + 1)  # n1 diagonal tiles, n3 <= 1 tail
    with kb.loop(kb.u32(0), kb.u32(rep)) as r_head:
        hh = c.head * rep + r_head if rep > 1 else c.head
        with kb.loop(f_lo, f_hi, blk, max_trips=tiles) as i0:
            body(hh, i0, False)
        with kb.loop(kb.u32(0), n1 + n3, max_trips=masked) as idx:
            i0 = kb.select(idx < n1, diag_lo + idx * blk, f_hi + (idx - n1) * blk)
            body(hh, i0, True)


# Faster variants (attention_coopmat registers one): each returns the kernel for the spec on
# the device, or None where it does not apply; the SIMT kernels run otherwise.
FAST_VARIANTS: list[Callable[[KernelSpec, object], KernelBinary | None]] = []


def _fast_variant(spec: KernelSpec, caps: object) -> KernelBinary | None:
    for gen in FAST_VARIANTS:
        found = gen(spec, caps)
        if found is not None:
            return found
    return None


_BWD_INPUTS = ("q", "k", "v", "o", "lse", "do")


def generate_attention_dq(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """dq = scale * sum_j dS_ij k_j, dS = P (dP - D), recomputing P from lse per key tile."""
    p = dict(spec.params)
    fast = _fast_variant(spec, caps)
    if fast is not None:
        return fast
    cfg = choose_config(p["t"], p["hd"], caps, _BWD_WORK)
    c, ins, outs = _prologue(spec, caps, cfg, _BWD_INPUTS, [("dq", "f32")])
    kb, t, hd, h, blk, scale = c.kb, p["t"], p["hd"], p["h"], c.cfg.block, p["scale"]
    q, k, v, dout = ins["q"], ins["k"], ins["v"], ins["do"]
    hk = c.head / (h // p["hkv"]) if h != p["hkv"] else c.head
    i = c.blk0 + c.tid
    ic = kb.fmin(i, t - 1)
    qb, dob = q.base(c.bi, c.head), dout.base(c.bi, c.head)
    qv = [q.at(qb, ic, d) * scale for d in range(hd)]
    dov = [dout.at(dob, ic, d) for d in range(hd)]
    lse, dd = _bwd_row_stats(c, ins, ic, c.head)
    kbase, vbase = k.base(c.bi, hk), v.base(c.bi, hk)
    k_sh, v_sh = kb.shared("f32", blk * hd), kb.shared("f32", blk * hd)
    acc = [kb.var("f32", 0.0) for _ in range(hd)]

    def body(j0: Value, masked: bool) -> None:
        kb.barrier()
        _load_tiles(c, j0, [(k, kbase, k_sh), (v, vbase, v_sh)], masked)
        kb.barrier()
        dss, oks = [], []
        for j in range(blk):
            pj = kb.exp(_dot(kb, qv, lambda d, j=j: k_sh.load(j * hd + d)) - lse)
            dp = _dot(kb, dov, lambda d, j=j: v_sh.load(j * hd + d))
            kj = c.keep(c.head, i, j0 + j)  # dropout scales dP as it scaled P forward
            ds = pj * ((dp if kj is None else dp * kj) - dd)
            if masked:
                oks.append(_allowed(c, j0 + j, i))
                ds = kb.select(oks[-1], ds, 0.0)
            dss.append(ds)
        for d in range(hd):
            a = acc[d].get()
            for j in range(blk):
                kv = k_sh.load(j * hd + d)
                a = kb.fma(dss[j], kb.select(oks[j], kv, 0.0) if masked else kv, a)
            acc[d].set(a)

    own_end = (lambda: kb.fmin(c.blk0 + c.cfg.rows, kb.u32(t))) if p["causal"] else None
    m_lo, m_hi, f_lo, f_hi = _masked_ranges(c, own_end)
    _loop_tiles(c, f_lo, f_hi, lambda j0: body(j0, False), t)
    _loop_tiles(c, m_lo, m_hi, lambda j0: body(j0, True), c.cfg.rows)  # diagonal or tail
    with kb.if_(i < t):
        qb = _out_base(c, h, c.head, i)
        for d in range(hd):
            outs["dq"].store(qb + d, acc[d].get() * scale)
    flops = 6 * p["b"] * h * t * t * hd // (2 if p["causal"] else 1)
    return kb.binary(spec, _grid(c, h, caps), notes={
        "flops": flops, "variant": f"simt flash dq rows {c.cfg.rows} tile {blk}"})


def generate_attention_dkdv(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """dv_j = sum_i P_ij dO_i, dk_j = scale * sum_i dS_ij q_i over every query head of the kv
    head (GQA) and query tile; D_i = dO_i . O_i is computed per tile, never stored."""
    p = dict(spec.params)
    fast = _fast_variant(spec, caps)
    if fast is not None:
        return fast
    outputs = p["outputs"]
    cfg = choose_config(p["t"], p["hd"], caps, _BWD_WORK)
    c, ins, outs = _prologue(spec, caps, cfg, _BWD_INPUTS, [(n, "f32") for n in outputs])
    kb, t, hd, h, hkv, blk, scale = c.kb, p["t"], p["hd"], p["h"], p["hkv"], c.cfg.block, \
        p["scale"]
    q, k, v, dout = ins["q"], ins["k"], ins["v"], ins["do"]
    j = c.blk0 + c.tid  # this invocation's key row
    jc = kb.fmin(j, t - 1)
    kb_base, vb_base = k.base(c.bi, c.head), v.base(c.bi, c.head)
    kv = [k.at(kb_base, jc, d) * scale for d in range(hd)]
    vv = [v.at(vb_base, jc, d) for d in range(hd)]
    q_sh, do_sh = kb.shared("f32", blk * hd), kb.shared("f32", blk * hd)
    lse_sh, dd_sh = kb.shared("f32", blk), kb.shared("f32", blk)
    dk = [kb.var("f32", 0.0) for _ in range(hd)]
    dv = [kb.var("f32", 0.0) for _ in range(hd)]

    def body(hh: Value, i0: Value, masked: bool) -> None:
        kb.barrier()
        qb, dob = q.base(c.bi, hh), dout.base(c.bi, hh)
        _load_tiles(c, i0, [(q, qb, q_sh), (dout, dob, do_sh)], masked)
        _stage_row_stats(c, ins, hh, i0, lse_sh, dd_sh)
        kb.barrier()
        terms = []
        for r in range(blk):
            pr = kb.exp(_dot(kb, kv, lambda d, r=r: q_sh.load(r * hd + d)) - lse_sh.load(r))
            dp = _dot(kb, vv, lambda d, r=r: do_sh.load(r * hd + d))
            kr = c.keep(hh, i0 + r, j)  # dropout: dV takes the dropped P, dS the dropped dP
            ds = pr * ((dp if kr is None else dp * kr) - dd_sh.load(r))
            pr = pr if kr is None else pr * kr
            ok = None
            if masked:  # key j visible to query i0 + r (inside T, not in its future)
                ii = i0 + r
                ok = (ii < t) & (j <= ii) if p["causal"] else ii < t
                pr, ds = kb.select(ok, pr, 0.0), kb.select(ok, ds, 0.0)
            terms.append((pr, ds, ok))
        for d in range(hd):
            a_dk, a_dv = dk[d].get(), dv[d].get()
            for r, (pr, ds, ok) in enumerate(terms):
                qx, dox = q_sh.load(r * hd + d), do_sh.load(r * hd + d)
                if ok is not None:
                    qx, dox = kb.select(ok, qx, 0.0), kb.select(ok, dox, 0.0)
                a_dv = kb.fma(pr, dox, a_dv)
                a_dk = kb.fma(ds, qx, a_dk)
            dk[d].set(a_dk)
            dv[d].set(a_dv)

    _query_tiles(c, body)
    with kb.if_(j < t):
        kvb = _out_base(c, hkv, c.head, j)
        for d in range(hd):
            if "dk" in outs:
                outs["dk"].store(kvb + d, dk[d].get() * scale)
            if "dv" in outs:
                outs["dv"].store(kvb + d, dv[d].get())
    flops = 8 * p["b"] * h * t * t * hd // (2 if p["causal"] else 1)
    return kb.binary(spec, _grid(c, hkv, caps), notes={
        "flops": flops, "variant": f"simt flash dkdv rows {c.cfg.rows} tile {blk}"})


# ---- lowering -------------------------------------------------------------------------------
def _entry(lw, a: int, n: int) -> tuple[tuple, int]:
    v = lw.need_view(a, n)
    return (lw.g.dtype(a).name, v.offset, tuple(v.strides)), v.base


def _shape_params(g, n: int) -> tuple:
    q, k = g.args(n)[:2]
    b, h, t, hd = g.shape(q)
    a = g.attrs(n)
    return (("b", b), ("h", h), ("hkv", g.shape(k)[1]), ("t", t), ("hd", hd),
            ("causal", bool(a["causal"])), ("scale", float(a["scale"])))


def _siblings(lw, n: int, ops: tuple[str, ...]) -> dict[str, int]:
    """Nodes of `ops` over the same arguments and attrs as n (one kernel computes them all),
    not lowered yet; includes n."""
    g = lw.g
    done = lw.__dict__.setdefault("_attention_done", set())
    def key(u: int) -> tuple:  # the dropout counter (a 4th/7th argument) is no difference
        a = g.attrs(u)
        return (tuple(g.args(u)[:3]), a["causal"], a["scale"])

    found: dict[str, int] = {}
    for u in [n, *g.users(g.args(n)[0])]:
        if g.op(u) in ops and u not in done and g.op(u) not in found and key(u) == key(n):
            found[g.op(u)] = u
    done.update(found.values())
    return found


def _lower(lw, n: int, family: str, ops: tuple[str, ...], out_names: dict[str, str],
           inputs: tuple[str, ...]) -> None:
    g = lw.g
    if n in lw.__dict__.get("_attention_done", set()):
        return  # written by a sibling's kernel
    sib = _siblings(lw, n, ops)
    names = tuple(out_names[o] for o in ops if o in sib)
    params = list(_shape_params(g, n))
    reads = []
    args = g.args(n)
    for name, a in zip(inputs, args[:len(inputs)], strict=True):
        entry, base = _entry(lw, a, n)
        params.append((name, entry))
        reads.append(base)
    drop = next((g.attrs(u) for u in sib.values() if g.attrs(u).get("dropout", 0.0) > 0), None)
    if drop is not None:  # the counter comes after the named inputs
        ctr = next(a for u in sib.values() for a in g.args(u)[len(inputs):])
        entry, base = _entry(lw, ctr, n)
        params += [("dropout", float(drop["dropout"])), ("seed", int(drop["seed"])),
                   ("salt", int(drop["salt"])), ("ctr", entry[1])]
        reads.append(base)
    if family == "attention_fwd":
        params.append(("out_dtype", g.dtype(sib["attention"]).name if "attention" in sib
                       else "f32"))
    if family != "attention_dq":
        params.append(("outputs", names))
    params.append(("coopmat", coopmat_allowed()))  # in the spec: the kernel caches follow it
    writes = [sib[o] for o in ops if o in sib]
    heads = [w for w in writes if g.op(w) != "attention_lse"]
    if heads and all(_read_head_transposed(g, w) for w in heads):
        params.append(("out_layout", "bthd"))
        for w in heads:  # consumers read the [B, heads, T, hd] value through these strides
            b_, h_, t_, d_ = g.shape(w)
            lw.views[w] = View(w, 0, (b_, h_, t_, d_), (t_ * h_ * d_, d_, h_ * d_, 1))
    b, h, t, hd = g.shape(g.args(n)[0])
    lw._emit(family, f"{family}_{b}x{h}x{t}x{hd}", tuple(params), reads, writes, writes, n)


def _read_head_transposed(g, w: int) -> bool:
    """Whether every use of attention result w reads it with heads and time swapped (the
    model's y.transpose(0, 2, 1, 3)) or is attention's own backward (any strides): then it is
    stored [B, T, heads, hd] and the reshape back to [B, T, C] needs no copy."""
    if w in g.roots():
        return False
    users = g.users(w)
    return any(g.op(u) == "transpose" for u in users) and all(
        (g.op(u) == "transpose" and tuple(g.attrs(u)["perm"]) == (0, 2, 1, 3))
        or g.op(u).startswith("attention_bwd") for u in users)


@register_kernel_lowering("attention")
@register_kernel_lowering("attention_lse")
def _lower_fwd(lw, n: int) -> None:
    _lower(lw, n, "attention_fwd", ("attention", "attention_lse"),
           {"attention": "o", "attention_lse": "lse"}, ("q", "k", "v"))


@register_kernel_lowering("attention_bwd_dq")
def _lower_dq(lw, n: int) -> None:
    _lower(lw, n, "attention_dq", ("attention_bwd_dq",), {"attention_bwd_dq": "dq"},
           _BWD_INPUTS)


@register_kernel_lowering("attention_bwd_dk")
@register_kernel_lowering("attention_bwd_dv")
def _lower_dkdv(lw, n: int) -> None:
    _lower(lw, n, "attention_dkdv", ("attention_bwd_dk", "attention_bwd_dv"),
           {"attention_bwd_dk": "dk", "attention_bwd_dv": "dv"}, _BWD_INPUTS)


from . import attention_coopmat  # noqa: E402, F401  (registers the tensor-core variant)
