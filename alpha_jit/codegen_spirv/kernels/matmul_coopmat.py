"""The matmul family's cooperative-matrix variant: tensor cores through SPV_KHR_cooperative_matrix.

Why: a SIMT tile multiplies at a few percent of a tensor-core GPU's bf16 rate; the same GEMM as
16 x 16 x 16 subgroup fragments runs an order of magnitude faster. It is a variant of the one
matmul family, not a second GEMM: the same spec (strided and batched operands, operands rounded
to bf16 on load, the epilogue region, the column sums of b) and the same bindings, dispatch grid
and push constants, so the lowering and the runtime cannot tell which variant they got.

Shape of the kernel (config: tile tm x tn x bk, a subgroup tile rm x rn, `lanes` per subgroup):
- The workgroup's subgroups form a (tm / rm) x (tn / rn) grid; each owns (rm/16) x (rn/16)
  f32 accumulator fragments in Function variables.
- Operands are staged by every thread through shared memory, whatever their strides: a as
  [tm][bk + 8], b as [bk][tn + 8] (16-byte row padding keeps fragment rows aligned and spreads
  banks). The global load order follows the operand's contiguous axis, so warps read
  neighbouring elements. The next K tile is loaded into registers while the current one is
  multiplied (register prefetch), so one shared buffer hides the global latency.
- f32 operands that the graph cast to bf16 are rounded on load to nearest even, exactly as the
  cast kernel they replace; the column sums of b add the values as loaded, before rounding.
- Each accumulator fragment is stored to the subgroup's own f32 scratch in shared memory; after
  a subgroup barrier every lane finishes 16*16/lanes elements through the family's epilogue
  store (bias, GELU, residual, output cast and rounding) with bounds checks.
"""

from __future__ import annotations

import math

from .. import coopmat
from ..dsl import KernelBuilder, Value, cap
from .elementwise import ScalarRule
from .matmul import _VARIANTS, CONFIG_CHOOSERS, MatmulConfig, _prologue, _u

_PAD = 8  # halves of padding per shared row: rows stay 16-byte aligned
_FRAG = 16  # the fragment edge (16 x 16 x 16 shapes)
_SCRATCH_LD = _FRAG + 4  # f32 scratch row stride: 80 bytes, a multiple of 16
_ELEM = {"bf16": "bf16n", "f16": "f16"}  # operand dtype -> fragment element type


def operand_elem(p: dict, name: str) -> str | None:
    """The fragment element type operand `name` feeds the tensor cores as, or None."""
    dt = p.get(f"{name}_round") or p[name][0]
    return _ELEM.get(dt)


def shared_bytes(cfg: MatmulConfig, colsum: bool) -> int:
    subgroups = (cfg.tm // cfg.rm) * (cfg.tn // cfg.rn)
    staged = 2 * (cfg.tm * (cfg.bk + _PAD) + cfg.bk * (cfg.tn + _PAD))
    return staged + 4 * subgroups * _FRAG * _SCRATCH_LD + (4 * cfg.bk * cfg.tn if colsum else 0)


def candidates(p: dict, caps: object) -> list[MatmulConfig]:
    """Every cooperative-matrix tiling that fits the device for this spec (the autotuner's
    search space), largest tiles first; empty where the variant does not apply."""
    elem = operand_elem(p, "a")
    if elem is None or operand_elem(p, "b") != elem or not coopmat.supported(caps, elem):
        return []
    lanes = coopmat.subgroup_size(caps)
    max_threads = int(cap(caps, "max_workgroup_invocations", 1024))  # type: ignore[arg-type]
    max_shared = int(cap(caps, "max_shared_memory", 32768))  # type: ignore[call-overload]
    out = []
    for tm, tn, rm, rn in ((128, 128, 64, 32), (64, 128, 32, 32), (128, 64, 32, 32),
                           (64, 64, 32, 32)):
        for bk in (32, 16):
            cfg = MatmulConfig("coopmat", tm, tn, bk, rm, rn, lanes or 32)
            if cfg.threads <= max_threads and \
                    shared_bytes(cfg, bool(p.get("colsum_b"))) <= max_shared:
                out.append(cfg)
                break
    return out


def choose(p: dict, caps: object) -> MatmulConfig | None:
    """The heuristic choice: the largest tile that still gives enough workgroups to fill a
    big GPU (the autotuner measures instead); None for GEMMs too small for 16 x 16 fragments."""
    if min(p["m"], p["n"], p["k"]) < _FRAG:
        return None
    cands = candidates(p, caps)
    for cfg in cands:
        groups = math.ceil(p["m"] / cfg.tm) * math.ceil(p["n"] / cfg.tn) * p["batch"]
        if groups >= 128:
            return cfg
    return cands[-1] if cands else None


def emit(kb: KernelBuilder, cfg: MatmulConfig, p: dict, rule: ScalarRule | None) -> None:
    """The cooperative-matrix GEMM body (see the module docstring)."""
    m, n, k = p["m"], p["n"], p["k"]
    elem = operand_elem(p, "a")
    assert elem is not None
    coopmat.enable(kb, elem)
    abuf, bbuf, store, tid, row0, col0, bi, _ = _prologue(kb, cfg, p, rule)
    tm, tn, bk, rm, rn, lanes, threads = cfg.tm, cfg.tn, cfg.bk, cfg.rm, cfg.rn, cfg.lanes, \
        cfg.threads
    lda, ldb = bk + _PAD, tn + _PAD
    a_sh, b_sh = kb.shared(elem, tm * lda), kb.shared(elem, bk * ldb)
    zero = kb.to_bf16n(kb.f32(0.0)) if elem == "bf16n" else kb.cast(kb.f32(0.0), elem)

    def slots(name: str, tile: int, size: int, dims: tuple) -> list:
        """Per-thread staging slots of one operand's tile x bk block: (k offset, shared
        index, k-independent global address, guard, plain index in the block)."""
        off, sb, s_outer, s_k = dims
        k_fast = abs(s_k) < abs(s_outer) or (s_k != 0 and s_outer == 0)
        base = _u(kb, off) + bi * _u(kb, sb) if sb else _u(kb, off)
        out = []
        for r in range(math.ceil(tile * bk / threads)):
            e = tid + r * threads
            kk, o = (e % bk, e / bk) if k_fast else (e / tile, e % tile)
            g = (row0 if name == "a" else col0) + o
            if size % tile:  # clamp: the row/column's products are never stored
                g = kb.fmin(g, size - 1)
            addr = base + g * _u(kb, s_outer) if s_outer else base
            sidx = o * lda + kk if name == "a" else kk * ldb + o
            guard = e < tile * bk if (r + 1) * threads > tile * bk else None
            out.append((kk, sidx, addr, guard, kk * tile + o, s_k))
        return out

    a_dims, b_dims = p["a"][1:], p["b"][1:]
    ops = [(abuf, a_sh, slots("a", tm, m, a_dims), p.get("a_round")),
           (bbuf, b_sh, slots("b", tn, n, (b_dims[0], b_dims[1], b_dims[3], b_dims[2])),
            p.get("b_round"))]
    regs = [[kb.var(elem) for _ in sl] for _, _, sl, _ in ops]
    csums = [kb.var("f32", 0.0) for _ in ops[1][2]] if store.colsum is not None else []

    def fetch(k0: Value) -> None:
        """Load the K tile starting at k0 into the registers (zeros past K)."""
        for oi, (buf, _sh, sl, rnd) in enumerate(ops):
            for si, (kk, _sidx, addr, _guard, _plain, s_k) in enumerate(sl):
                kg = k0 + kk
                raw = buf.load_raw(addr + kb.fmin(kg, k - 1) * _u(kb, s_k))
                # f32 data the graph cast to bf16: round as the cast did
                v = kb.to_bf16n(raw) if rnd is not None else raw
                regs[oi][si].set(kb.select(kg < k, v, zero))
                if oi == 1 and csums:
                    wide = kb.from_bf16n(raw) if raw.dtype == "bf16n" else kb.cast(raw, "f32")
                    f = kb.select(kg < k, wide, 0.0)
                    csums[si].set(csums[si].get() + f)

    sg, lane = tid / lanes, tid % lanes
    sr, sc = sg / (tn // rn), sg % (tn // rn)
    fa = coopmat.Frag(kb, elem, "a")
    fb = coopmat.Frag(kb, elem, "b")
    fc = coopmat.Frag(kb, "f32", "acc")
    fm, fn = rm // _FRAG, rn // _FRAG
    acc = [[fc.var() for _ in range(fn)] for _ in range(fm)]
    fetch(kb.u32(0))
    with kb.loop(kb.u32(0), k, bk) as k0:
        for oi, (_buf, sh, sl, _rnd) in enumerate(ops):
            for si, (_kk, sidx, _addr, guard, _plain, _s) in enumerate(sl):
                if guard is None:
                    sh.store(sidx, regs[oi][si].get())
                else:
                    with kb.if_(guard):
                        sh.store(sidx, regs[oi][si].get())
        kb.barrier()
        with kb.if_(k0 + bk < k):  # the next tile's global loads overlap this tile's math
            fetch(k0 + bk)
        for kk in range(0, bk, _FRAG):
            av = [fa.load(a_sh, (sr * rm + i * _FRAG) * lda + kk, lda) for i in range(fm)]
            bv = [fb.load(b_sh, sc * rn + (kk * ldb + j * _FRAG), ldb) for j in range(fn)]
            for i in range(fm):
                for j in range(fn):
                    acc[i][j].set(fc.mul_add(av[i], bv[j], acc[i][j].get()))
        kb.barrier()  # everyone has read the tiles before the next iteration overwrites them
    if csums:
        _colsum(kb, cfg, store, ops[1][2], csums, tid, row0, col0, n)
    scratch = kb.shared("f32", (threads // lanes) * _FRAG * _SCRATCH_LD)
    base = sg * (_FRAG * _SCRATCH_LD)
    out_base = bi * (m * n)
    for i in range(fm):
        for j in range(fn):
            fc.store(scratch, base, acc[i][j].get(), _SCRATCH_LD)
            coopmat.subgroup_barrier(kb)
            for t in range(_FRAG * _FRAG // lanes):
                e = lane + t * lanes
                r, c = e / _FRAG, e % _FRAG
                v = scratch.load(base + r * _SCRATCH_LD + c)
                row = row0 + sr * rm + (i * _FRAG) + r
                col = col0 + sc * rn + (j * _FRAG) + c
                conds = ([row < m] if m % tm else []) + ([col < n] if n % tn else [])
                idx = out_base + row * n + col
                if conds:
                    ok = conds[0] if len(conds) == 1 else conds[0] & conds[1]
                    with kb.if_(ok):
                        store.finish((bi, row, col), idx, v)
                else:
                    store.finish((bi, row, col), idx, v)
            coopmat.subgroup_barrier(kb)  # lanes have read before the next fragment lands


def _colsum(kb: KernelBuilder, cfg: MatmulConfig, store: object, b_slots: list, csums: list,
            tid: Value, row0: Value, col0: Value, n: int) -> None:
    """Fold the per-slot column sums of b (a slot keeps one column and k offset) through a
    bk x tn shared array; the first row of workgroups stores them."""
    sh = kb.shared("f32", cfg.bk * cfg.tn)
    for (_kk, _sidx, _addr, guard, plain, _s), cs in zip(b_slots, csums, strict=True):
        if guard is None:
            sh.store(plain, cs.get())
        else:
            with kb.if_(guard):
                sh.store(plain, cs.get())
    kb.barrier()
    col = col0 + tid
    ok = (tid < cfg.tn) & (row0 == 0)
    if n % cfg.tn:
        ok = ok & (col < n)
    with kb.if_(ok):
        total = sh.load(tid)
        for kk in range(1, cfg.bk):
            total = total + sh.load(tid + kk * cfg.tn)
        store.colsum.store(col, total)  # type: ignore[attr-defined]


_VARIANTS["coopmat"] = emit
CONFIG_CHOOSERS.append(choose)
