"""The matmul family's cooperative-matrix variant: tensor cores through SPV_KHR_cooperative_matrix.

Why: a SIMT tile multiplies at a few percent of a tensor-core GPU's bf16 rate; the same GEMM as
16 x 16 x 16 subgroup fragments runs an order of magnitude faster. It is a variant of the one
matmul family, not a second GEMM: the same spec (strided and batched operands, operands rounded
to bf16 on load, the epilogue region, the column sums of b) and the same bindings, dispatch grid
and push constants, so the lowering and the runtime cannot tell which variant they got.

Shape of the kernel (config: tile tm x tn x bk, a subgroup tile rm x rn, `lanes` per subgroup):
- The workgroup's subgroups form a (tm / rm) x (tn / rn) grid; each owns (rm/16) x (rn/16)
  f32 accumulator fragments in Function variables.
- Operands are staged by every thread through shared memory, whatever their strides
  (coopmat_staging.py: 16-byte loads in the operand's own layout where aligned, else one
  element per load; rows padded by 16 bytes). The next K tile is loaded into registers while
  the current one is multiplied (register prefetch), so one shared buffer hides the latency.
- f32 operands that the graph cast to bf16 are rounded on load to nearest even, exactly as the
  cast kernel they replace; the column sums of b add the values as loaded, before rounding.
- Each accumulator fragment is stored to the subgroup's own f32 scratch in shared memory; after
  a subgroup barrier each lane finishes 8 adjacent elements of a row through the family's
  epilogue store (bias, GELU, residual, output cast and rounding), its inputs and outputs
  moved as 16-byte vectors where rows allow, else 16*16/lanes elements one at a time; with
  bounds checks. Where the tiles cover M x N exactly (`store_path`) a plain f32 output is
  stored straight from the fragments, and an epilogue that reads residuals runs on each
  lane's own elements at their probed rows and columns (fragments.py), every output then
  stored as a fragment of its dtype (GELU epilogues, the LM head's bf16 logits and bias
  epilogues measured faster through the scratch as vectors).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .. import coopmat, fragments
from ..dsl import Buffer, KernelBuilder, Value, cap
from .coopmat_staging import _PAD, Layout, Staged
from .elementwise import VECTOR_WIDTH, ScalarRule, round_to
from .matmul import (
    _VARIANTS,
    CONFIG_CHOOSERS,
    KSums,
    MatmulConfig,
    _prologue,
    in_tile_bounds,
    ksum_side,
    workgroup_limits,
)

_FRAG = 16  # the fragment edge (16 x 16 x 16 shapes)
_SCRATCH_LD = _FRAG + 4  # f32 scratch row stride: 80 bytes, a multiple of 16
_ELEM = {"bf16": "bf16n", "f16": "f16"}  # operand dtype -> fragment element type
_ELEM_BYTES = {"f32": 4, "bf16": 2, "f16": 2}  # outputs a fragment store can write
_AFFINE_OPS = frozenset({"add", "sub", "mul", "neg", "cast"})  # epilogues stored as fragments
_VEC = 8  # output elements a lane stores as vectors on the scratch path (`_row_vectors`)
_VECTORS = True  # False: element stores on every scratch path (the GPU tests compare them)


def operand_elem(p: dict, name: str) -> str | None:
    """The fragment element type operand `name` feeds the tensor cores as, or None."""
    dt = p.get(f"{name}_round") or p[name][0]
    return _ELEM.get(dt)


def shared_bytes(cfg: MatmulConfig, side: str | None) -> int:
    """Workgroup memory of a tiling, whichever layout each operand is staged in (bound);
    `side`: the operand whose K sums are folded through shared memory ("a", "b" or None)."""
    subgroups = (cfg.tm // cfg.rm) * (cfg.tn // cfg.rn)
    staged = 2 * sum(max(t * (cfg.bk + _PAD), cfg.bk * (t + _PAD)) for t in (cfg.tm, cfg.tn))
    sums = 4 * cfg.bk * (cfg.tn if side == "b" else cfg.tm) if side else 0
    return staged + 4 * subgroups * _FRAG * _SCRATCH_LD + sums


_FILL = 128  # workgroups that keep a big GPU busy (the H200 has 132 multiprocessors)
_MIN_SLICE = 256  # K per split-K slice below which the reducing pass costs more than it saves
# K from which splitting pays even for grids that fill the GPU: a weight gradient over 8192
# tokens with b's column sums ran 2.6x faster as 128 x 64 tiles split 4 than as whole
# 128 x 128 ones (H200, session 4, when each staging slot had its own 8 column-sum registers)
_LONG_K = 2048
_LONG_K_WORKSPACE = 64 << 20  # ... unless the partial sums would take more than this (step memory)
_LONG_K_SPLIT = 32  # a 384 x 384 weight gradient has 9 tiles of 128 x 128 ...
_LONG_K_SLICE = 512  # ... and K = 16384: 32 slices of 512 fill the GPU twice
_DEEP_BK = 64  # the K step of the deep 128 x 128 candidates
_REDUCE_UNROLL = 4  # split-K pass 1: elements each thread sums per loop trip
# consecutive workgroups walk 16 rows of tiles at a time where b is larger than this (about
# two thirds of the H200's L2; see `tile_order`): the LM head's forward took 2.84 ms against
# 3.09 a row at a time (isolated), 2.97 against 3.16 in the step, where the layers' GEMMs
# (b of at most 5 MB) ran 2-4% slower so walked (H200, session 11)
_TILE_GROUP = 16
_TILE_GROUP_MIN_B = 32 << 20


def _groups(p: dict, cfg: MatmulConfig) -> int:
    return math.ceil(p["m"] / cfg.tm) * math.ceil(p["n"] / cfg.tn) * p["batch"]


def candidates(p: dict, caps: object) -> list[MatmulConfig]:
    """Every cooperative-matrix tiling that fits the device for this spec (the autotuner's
    search space), largest tiles first, each also split over K where its grid is too small
    to fill the GPU or K is long (`_splits`), then the deep (bk 64) 128 x 128 ones (split
    too for long K); empty where the variant does not apply."""
    elem = operand_elem(p, "a")
    if elem is None or operand_elem(p, "b") != elem or not coopmat.supported(caps, elem):
        return []
    lanes = coopmat.subgroup_size(caps)
    max_threads = int(cap(caps, "max_workgroup_invocations", 1024))  # type: ignore[arg-type]
    max_shared = int(cap(caps, "max_shared_memory", 32768))  # type: ignore[call-overload]
    out = []
    # (tile, subgroup tile): 64 x 64 per subgroup loads 8 fragments per 16 products, 64 x 32
    # 6 per 8; more subgroups per tile share its shared-memory traffic
    for tm, tn, rm, rn in ((128, 256, 64, 64), (256, 128, 64, 64), (128, 128, 64, 64),
                           (128, 128, 64, 32), (64, 128, 32, 32), (128, 64, 32, 32),
                           (64, 64, 32, 32)):
        if tm * tn > 128 * 128 and p["m"] * p["n"] * p["batch"] < 64 * tm * tn:
            continue  # big tiles only where there are many of them
        for bk in (32, 16):
            cfg = MatmulConfig("coopmat", tm, tn, bk, rm, rn, lanes or 32)
            if cfg.threads <= max_threads and shared_bytes(cfg, ksum_side(p)) <= max_shared:
                out.append(cfg)
                split = 2
                while _splits(p, cfg, split):
                    out.append(dataclasses.replace(cfg, split=split))
                    split *= 2
                break
    # 128 x 128 tiles again with K steps of 64, where they fit: half the barriers per K. On
    # the H200 they won for K of 384-3072 (about 170 against 150 TFLOP/s at K = 384) and lost
    # for 4096^3 (they hold fewer workgroups per multiprocessor); measured, not the heuristic's
    deep = [dataclasses.replace(c, bk=_DEEP_BK) for c in out
            if (c.tm, c.tn) == (128, 128) and c.bk < _DEEP_BK
            and (c.split == 1 or p["k"] >= _LONG_K)]
    return out + [c for c in deep if c.bk <= p["k"]
                  and shared_bytes(c, ksum_side(p)) <= max_shared]


def _splits(p: dict, cfg: MatmulConfig, split: int) -> bool:
    """Whether K split `split` ways is a candidate: slices of at least _MIN_SLICE while the
    grid stays under two waves; for long K (weight gradients) up to _LONG_K_SPLIT ways, slices
    of _LONG_K_SLICE, three waves (4 ways whatever the grid), within the workspace bound."""
    groups = _groups(p, cfg) * split
    if split * cfg.lanes > cfg.rm * cfg.rn:  # pass 1 gives every thread an element at least
        return False
    if p["k"] < _LONG_K:
        return p["k"] >= split * _MIN_SLICE and split <= 8 and groups <= 2 * _FILL
    return p["k"] >= split * _LONG_K_SLICE and split <= _LONG_K_SPLIT \
        and (split <= 4 or groups <= 3 * _FILL) \
        and workspace_bytes(p, dataclasses.replace(cfg, split=split)) <= _LONG_K_WORKSPACE


def search(p: dict, caps: object) -> list[MatmulConfig]:
    """The autotuner's short list (each candidate is a kernel to generate, compile and time):
    the largest tile of at least 128 x 128 that fills the GPU, the 64 x 64-per-subgroup
    128 x 128 tile and the deep (K step 64) 128 x 128 tile; for grids too small to fill it,
    the two best split-K depths of 128 x 128; for long K, 128 x 128 split into the first two
    depths that fill the GPU (up to 32 ways) and the deep tile split 8 ways or more. Smaller
    tiles only where M or N is at most 64 (or nothing else fits).

    Pruned from 39 GEMM shapes of `small` and `gpt2` timed on the H200 (session 9's autotune
    cache): 256 x 128 (next to 128 x 256), 128 x 128 with 64 x 32 per subgroup at K step 32,
    64 x 64 tiles (whole or split), the deep tile split 2 or 4 ways and the deep 64 x 32 one
    split at all (and 128 x 64 / 64 x 128) were 116 of 236 candidates and would have cost 3 us
    of the best times summed: kernels the driver compiled for nothing in every cold build."""
    every = candidates(p, caps)
    cands = [c for c in every if c.bk < _DEEP_BK]
    whole = [c for c in cands if c.split == 1]
    narrow = min(p["m"], p["n"]) <= 64  # 128 x 128 tiles would be half empty
    filled = [c for c in whole if _groups(p, c) >= _FILL and (narrow or c.tm * c.tn >= 1 << 14)]
    out = filled[:1] + [c for c in filled[1:] if (c.tm, c.tn, c.rm, c.rn) == (128, 128, 64, 64)]
    # the deep tile with 64 x 32 per subgroup (64 x 64 per subgroup never won deep)
    out += [c for c in every if (c.bk, c.rn, c.split) == (_DEEP_BK, 32, 1)
            and _groups(p, c) >= _FILL]
    if len(filled) < 2:
        for tm, tn in ((128, 128), (64, 64)) if narrow else ((128, 128),):
            splits = [c for c in cands if (c.tm, c.tn, c.split > 1) == (tm, tn, True)
                      and (c.rm, c.rn) == (64 if tm == 128 else 32,) * 2]
            fill = [c for c in splits if _groups(p, c) * c.split >= _FILL]
            out += fill[:2] if fill else splits[-1:]
        out += [c for c in whole[-1:] if c not in out and (narrow or c.tm == 128)]
    if p["k"] >= _LONG_K:  # long K (weight gradients): 128 x 128 tiles split into waves
        for deep, least in ((False, 2), (True, 8)):  # shallow: whichever K step fits
            big = [c for c in every if (c.tm, c.tn, c.rm, c.rn) == (128, 128, 64, 64)
                   and (c.bk == _DEEP_BK) == deep and c.split >= least
                   and _groups(p, c) * c.split >= _FILL]
            out += [c for c in big[:2] if c not in out]
    return out if out else whole[-1:]


def choose(p: dict, caps: object) -> MatmulConfig | None:
    """The heuristic choice: the largest tile that still gives enough workgroups to fill a
    big GPU, else the smallest tile split over K until it does (the autotuner measures
    instead); None for GEMMs too small for 16 x 16 fragments."""
    if min(p["m"], p["n"], p["k"]) < _FRAG:
        return None
    cands = [c for c in candidates(p, caps) if c.bk < _DEEP_BK]
    whole = [c for c in cands if c.split == 1]
    for cfg in whole:
        if _groups(p, cfg) >= _FILL:
            return cfg
    if not whole:
        return None
    small = whole[-1]
    splits = [c for c in cands if c.split > 1 and (c.tm, c.tn) == (small.tm, small.tn)]
    for cfg in splits:
        if _groups(p, cfg) * cfg.split >= _FILL:
            return cfg
    return splits[-1] if splits else small


def workspace_bytes(p: dict, cfg: MatmulConfig) -> int:
    """Bytes of the split-K workspace: each slice's partial (B, M, N) sums, padded to whole
    tiles (fragments are stored unchecked), then each slice's K sums of b (or a)."""
    mp, np_ = _round_up(p["m"], cfg.tm), _round_up(p["n"], cfg.tn)
    return 4 * cfg.split * (p["batch"] * mp * np_ + max(mp, np_))


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


def emit(kb: KernelBuilder, cfg: MatmulConfig, p: dict, rule: ScalarRule | None) -> None:
    """The cooperative-matrix GEMM body (see the module docstring). With split > 1 the grid's
    z axis is batch x slice: pass 0 (push constant phase) multiplies the slice's K range and
    stores its fragments to the workspace, pass 1 adds the slices and runs the epilogue."""
    m, n, k = p["m"], p["n"], p["k"]
    elem = operand_elem(p, "a")
    assert elem is not None
    coopmat.enable(kb, elem)
    abuf, bbuf, store, tid, row0, col0, z, pc = _prologue(kb, cfg, p, rule)
    row0, col0 = _tile_order(kb, cfg, p, row0, col0)
    if cfg.split == 1:
        _, acc, csums, sg = _multiply(kb, cfg, p, abuf, bbuf, tid, row0, col0, z, kb.u32(0),
                                      kb.u32(k), k)
        if csums:
            _colsum(kb, cfg, csums, tid, KSums.of(store.side, cfg, p, row0, col0),
                    lambda i, total: store.colsum.store(i, total))  # type: ignore
        _finish_fragments(kb, cfg, p, store, acc, sg, tid, row0, col0, z)
        return
    split = cfg.split
    ws = kb.buffer("split_ws", "f32", writable=True)
    mp, np_ = _round_up(m, cfg.tm), _round_up(n, cfg.tn)
    cs_base, cs_len = split * p["batch"] * mp * np_, max(mp, np_)
    with kb.if_else(pc["phase"] == 0) as (slices, total):
        with slices:
            bi, sl = z / split, z % split
            chunk = _round_up(math.ceil(k / split), cfg.bk)
            k_lo = sl * chunk
            k_hi = kb.fmin(k_lo + chunk, k)
            fc, acc, csums, sg = _multiply(kb, cfg, p, abuf, bbuf, tid, row0, col0, bi, k_lo,
                                           k_hi, chunk)
            sr, sc = sg / (cfg.tn // cfg.rn), sg % (cfg.tn // cfg.rn)
            for i, row in enumerate(acc):
                for j, frag in enumerate(row):
                    r = row0 + sr * cfg.rm + i * _FRAG
                    c = col0 + sc * cfg.rn + j * _FRAG
                    fc.store(ws, ((sl * p["batch"] + bi) * mp + r) * np_ + c, frag.get(), np_)
            if csums:
                _colsum(kb, cfg, csums, tid, KSums.of(store.side, cfg, p, row0, col0),
                        lambda i, t: ws.store(cs_base + sl * cs_len + i, t))
        with total:
            _reduce_slices(kb, cfg, p, store, ws, tid, row0, col0, z,
                           (mp, np_, cs_base, cs_len))


def tile_order(lin: Any, nx: int, ny: int, group: int, fmin: Any = min) -> tuple[Any, Any]:
    """(tile row, tile column) of the `lin`-th workgroup launched (ints or kernel Values) on
    an nx x ny grid of tiles, walked `group` tile rows at a time, column by column: the
    workgroups in flight together then read few panels of a and b. A row at a time, the LM
    head's forward (8192 x 50304 x 768) streamed all 77 MB of its weights, more than L2 holds,
    once per row of tiles."""
    first = lin // (group * nx) * group
    rows = fmin(ny - first, group)  # the last group may have fewer rows
    local = lin % (group * nx)
    return first + local % rows, local // rows


def grouped(p: dict, cfg: MatmulConfig, caps: object) -> bool:
    """Whether the tiles are walked by `tile_order`: b larger than _TILE_GROUP_MIN_B, more
    tile rows than a group, and the grid in one dispatch (its bases are 0)."""
    lim = workgroup_limits(caps)
    nx, ny = math.ceil(p["n"] / cfg.tn), math.ceil(p["m"] / cfg.tm)
    b_bytes = p["k"] * p["n"] * (4 if p["b"][0] == "f32" else 2)
    return ny > _TILE_GROUP and nx <= lim[0] and ny <= lim[1] and b_bytes > _TILE_GROUP_MIN_B


def _tile_order(kb: KernelBuilder, cfg: MatmulConfig, p: dict, row0: Value,
                col0: Value) -> tuple[Value, Value]:
    """(row0, col0) of this workgroup's tile: by `tile_order` where `grouped`, else the
    grid's own."""
    if not grouped(p, cfg, kb.caps):
        return row0, col0
    nx, ny = math.ceil(p["n"] / cfg.tn), math.ceil(p["m"] / cfg.tm)
    lin = kb.workgroup_id(1) * nx + kb.workgroup_id(0)  # x fastest: the launch order
    r, c = tile_order(lin, nx, ny, _TILE_GROUP, kb.fmin)
    return r * cfg.tm, c * cfg.tn


def _multiply(kb: KernelBuilder, cfg: MatmulConfig, p: dict, abuf: Buffer, bbuf: Buffer,
              tid: Value, row0: Value, col0: Value, bi: Value, k_lo: Value, k_hi: Value,
              k_span: int) -> tuple:
    """The main loop over k in [k_lo, k_hi) (at most k_span apart): both operands staged
    (coopmat_staging.py), fragments multiplied into the accumulators. Returns (accumulator
    type, accumulators [i][j], the K-sum entries of b or a, subgroup id)."""
    elem = operand_elem(p, "a")
    assert elem is not None
    a_dt, a_off, a_sb, a_sm, a_sk = p["a"]
    b_dt, b_off, b_sb, b_sk, b_sn = p["b"]
    side = ksum_side(p)
    a = Staged(kb, "a", abuf, Layout(a_off, a_sb, a_sm, a_sk, p["m"], cfg.tm, p.get("a_round")),
               cfg.bk, cfg.threads, elem, tid, row0, bi, p["k"], p["batch"], side == "a")
    b = Staged(kb, "b", bbuf, Layout(b_off, b_sb, b_sn, b_sk, p["n"], cfg.tn, p.get("b_round")),
               cfg.bk, cfg.threads, elem, tid, col0, bi, p["k"], p["batch"], side == "b")
    sg = kb.subgroup_id()  # fragments belong to the hardware subgroup, whatever its lanes
    sr, sc = sg / (cfg.tn // cfg.rn), sg % (cfg.tn // cfg.rn)
    fa = coopmat.Frag(kb, elem, "a")
    fb = coopmat.Frag(kb, elem, "b")
    fc = coopmat.Frag(kb, "f32", "acc")
    fm, fn = cfg.rm // _FRAG, cfg.rn // _FRAG
    acc = [[fc.var() for _ in range(fn)] for _ in range(fm)]

    a.fetch(k_lo)
    b.fetch(k_lo)
    # one shared tile and the next one in registers: a 2-stage shared ring (one barrier per
    # K tile) ran 10-40% slower on the H200 at every shape tried (its tiles take twice the
    # shared memory: fewer workgroups per multiprocessor); fetching two tiles ahead (a second
    # set of registers) ran 2-7% slower on gpt2's GEMMs (session 11)
    with kb.loop(k_lo, k_hi, cfg.bk, max_trips=math.ceil(k_span / cfg.bk)) as k0:
        a.stash(k0, k_hi)
        b.stash(k0, k_hi)
        kb.barrier()
        with kb.if_(k0 + cfg.bk < k_hi):  # the next tile's global loads overlap the math
            a.fetch(k0 + cfg.bk)
            b.fetch(k0 + cfg.bk)
        for kk in range(0, cfg.bk, _FRAG):
            av = [a.fragment(fa, sr * cfg.rm + i * _FRAG, kk) for i in range(fm)]
            bv = [b.fragment(fb, sc * cfg.rn + j * _FRAG, kk) for j in range(fn)]
            for i in range(fm):
                for j in range(fn):
                    acc[i][j].set(fc.mul_add(av[i], bv[j], acc[i][j].get()))
        kb.barrier()  # everyone has read the tiles before the next iteration overwrites them
    summed = a if side == "a" else b
    return fc, acc, summed.colsum_entries() if summed.csums else [], sg


def _guarded_finish(kb: KernelBuilder, cfg: MatmulConfig, p: dict, store: object, bi: Value,
                    row: Value, col: Value, v: Value) -> None:
    """store.finish of one element, skipped outside (M, N) where the tile overhangs."""
    m, n = p["m"], p["n"]
    with kb.when(in_tile_bounds(row, col, m, n, cfg.tm, cfg.tn)):
        store.finish((bi, row, col), bi * (m * n) + row * n + col, v)  # type: ignore


def epilogue_kind(p: dict) -> str | None:
    """"bias" for an epilogue of adds, multiplies and casts only into float outputs whose
    inputs vary along N alone (a bias by column, output casts), "affine" for such an epilogue
    with an input that varies by row or batch (a residual), "other" for any other (GELU, a
    bool output), None without one; the tuner's stand-in of a GEMM carries its kind as
    ("epilogue_store", kind)."""
    ep = p.get("epilogue")
    if ep is None:
        return p.get("epilogue_store")
    affine = all(op in _AFFINE_OPS for op, *_ in ep[1]) \
        and all(dt in _ELEM_BYTES for dt, _ in ep[2])
    if not affine:
        return "other"
    return "affine" if any(any(st[:-1]) for _, st, *_ in ep[0]) else "bias"


def store_path(cfg: MatmulConfig, p: dict, caps: object) -> str:
    """How the accumulators reach the output(s):
    - "direct": a plain f32 output the tiles cover exactly, each fragment stored as it is;
    - "vectors": through the subgroup's shared scratch, 8 adjacent elements per lane, each
      output stored as 16-byte vectors (`_vectors_fit`), for GELU epilogues, overhanging
      tiles and K sums, and for exact tiles with no epilogue inputs but by column;
    - "fragments": exact tiles with an epilogue reading residuals (by row and column): run
      on each lane's elements of a fragment at their probed rows and columns, each output
      rounded to its dtype and stored as a fragment (the accumulator's probed layout,
      16-byte output rows; without them such an epilogue takes the vectors where they fit);
    - "scratch": through the scratch element by element (where nothing above fits).
    On the H200 (gpt2, session 12) vectors against fragments: the LM head's cast 2.98 ->
    2.89 ms, the qkv bias 0.153 -> 0.148 ms, but residual epilogues 0.183 -> 0.192 ms;
    against element stores the GELU epilogue 0.244 -> 0.241 ms. GELU through fragments took
    0.279 ms against 0.242 through the scratch (session 9)."""
    kind = epilogue_kind(p)
    if cfg.split == 1 and ksum_side(p) is None and not p.get("acc_buffer") \
            and p["m"] % cfg.tm == 0 and p["n"] % cfg.tn == 0:
        if kind is None and p["out_dtype"] == "f32" and p["n"] % 4 == 0:
            return "direct"
        if kind in (None, "bias") and _vectors_fit(cfg, p):
            return "vectors"
        rm = accumulator_map(caps)
        if kind != "other" and rm is not None and rm.lanes == cfg.lanes and all(
                dt in _ELEM_BYTES and p["n"] * _ELEM_BYTES[dt] % 16 == 0
                and (dt == "f32" or coopmat.supported(caps, _ELEM[dt]))
                for dt in _out_dtypes(p)):
            return "fragments"
    return "vectors" if _vectors_fit(cfg, p) else "scratch"


def _out_dtypes(p: dict) -> list[str]:
    ep = p.get("epilogue")
    return [dt for dt, _ in ep[2]] if ep is not None else [p["out_dtype"]]


def _vectors_fit(cfg: MatmulConfig, p: dict) -> bool:
    """Whether the scratch path stores 8 adjacent elements per lane as 16-byte vectors
    (`_row_vectors`): one K slice, 32 lanes (a lane per half row of a fragment), bf16 or f32
    outputs only, and rows (N) a multiple of 8 elements. Scalar 2-byte stores, 16 lanes per
    row, were most of a bf16 epilogue's stores."""
    return _VECTORS and cfg.split == 1 and cfg.lanes == 32 and not p.get("acc_buffer") \
        and p["n"] % _VEC == 0 and all(dt in VECTOR_WIDTH for dt in _out_dtypes(p))


def accumulator_map(caps: object) -> fragments.RowMap | None:
    """Where a lane's elements of a 16 x 16 f32 accumulator sit (probed), or None."""
    getter = getattr(caps, "fragment_layout", None)
    return fragments.analyse(getter("f32", "acc")) if getter is not None else None


def _finish_fragments(kb: KernelBuilder, cfg: MatmulConfig, p: dict, store: object,
                      acc: list, sg: Value, tid: Value, row0: Value, col0: Value,
                      bi: Value) -> None:
    """The accumulators through the epilogue store, by `store_path`.

    "fragments" is straight-line code over every fragment of the subgroup (the epilogue's
    code once per element the lane holds): on the H200 a runtime loop over the fragments
    made every epilogue GEMM of gpt2 slower, up to 25% (sweep 8, session 9).
    "vectors" and "scratch" are a runtime loop over the fragments (a uniform branch picks
    the one to store to the scratch), each lane finishing its elements in straight-line code
    (8 adjacent ones as vectors, `_row_vectors`, or 16*16/lanes one at a time): the
    epilogue's loads (bias, residual) of those elements are in flight together. A loop per
    lane over them made every load wait for the one before: K = 384 GEMMs with a residual
    epilogue ran at a third of their main loop's speed on the H200. Its epilogue code is in
    the module once per element a lane finishes (not once per fragment: module size and the
    driver's compile time grow with it)."""
    path = store_path(cfg, p, kb.caps)
    m, n = p["m"], p["n"]
    sr, sc = sg / (cfg.tn // cfg.rn), sg % (cfg.tn // cfg.rn)
    if path == "direct":
        for i, row in enumerate(acc):
            for j, frag in enumerate(row):
                r = row0 + sr * cfg.rm + i * _FRAG
                c = col0 + sc * cfg.rn + j * _FRAG
                frag.frag.store(store.out, bi * (m * n) + r * n + c, frag.get(), n)  # type: ignore
        return
    lanes = cfg.lanes
    lane = kb.subgroup_invocation_id()
    frags = [f for row in acc for f in row]
    fn = len(acc[0])
    fc = frags[0].frag
    if path == "fragments":
        finish = _fragment_epilogue(kb, p, store, fc, lane)
        for f, frag in enumerate(frags):
            finish(bi, row0 + sr * cfg.rm + (f // fn) * _FRAG,
                   col0 + sc * cfg.rn + (f % fn) * _FRAG, frag.get())
        return
    scratch = kb.shared("f32", (cfg.threads // lanes) * _FRAG * _SCRATCH_LD)
    base = sg * (_FRAG * _SCRATCH_LD)
    vectors = _row_vectors(kb, p, store) if path == "vectors" else None
    with kb.loop(kb.u32(0), len(frags)) as f:
        for idx, frag in enumerate(frags):  # f is uniform: one branch taken, by the subgroup
            with kb.if_(f == idx):
                fc.store(scratch, base, frag.get(), _SCRATCH_LD)
        coopmat.subgroup_barrier(kb)
        frow = row0 + sr * cfg.rm + (f / fn) * _FRAG
        fcol = col0 + sc * cfg.rn + (f % fn) * _FRAG
        if vectors is not None:  # a lane per half row: 8 adjacent elements
            r, c = lane / 2, (lane % 2) * _VEC
            v = [scratch.load(base + r * _SCRATCH_LD + c + j) for j in range(_VEC)]
            vectors(bi, frow + r, fcol + c, v, in_tile_bounds(frow + r, fcol + c, m, n,
                                                                cfg.tm, cfg.tn))
        else:
            for it in range(_FRAG * _FRAG // lanes):  # rows lanes/16 apart, 16 lanes per row
                e = lane + it * lanes
                r, c = e / _FRAG, e % _FRAG
                v = scratch.load(base + r * _SCRATCH_LD + c)
                _guarded_finish(kb, cfg, p, store, bi, frow + r, fcol + c, v)
        coopmat.subgroup_barrier(kb)  # lanes have read before the next fragment lands


def _row_vectors(kb: KernelBuilder, p: dict, store: object) -> object:
    """finish(bi, row, col, values, guard): 8 adjacent output elements from (row, col) of
    batch bi through the epilogue store as 16-byte vectors (`EpilogueStore.finish_run`),
    skipped where `guard` is false (`_vectors_fit`: whole vectors are in range or out)."""
    m, n = p["m"], p["n"]

    def finish(bi: Value, row: Value, col: Value, values: list, guard: Value | None) -> None:
        with kb.when(guard):
            store.finish_run((bi, row, col), bi * (m * n) + row * n + col,  # type: ignore
                             values)

    return finish


def _fragment_epilogue(kb: KernelBuilder, p: dict, store: object, fc: coopmat.Frag,
                       lane: Value) -> object:
    """finish(bi, frow, fcol, x): fragment x, whose cell (0, 0) is (frow, fcol) of batch bi,
    through the epilogue element by element (each lane's elements at their probed rows and
    columns), every output rounded to its dtype as a stored element is (nearest even), then
    converted (exactly: the H200's fragment conversion to bf16 truncates) and stored as one
    fragment per output. (The conversion may flush a bf16 denormal, below 1.2e-38, to zero
    where the scratch path writes its bits.)"""
    rm = accumulator_map(kb.caps)
    assert rm is not None
    at = fragments.Lanes(kb, rm, lane)
    m, n = p["m"], p["n"]
    bufs = store.buffers  # type: ignore[attr-defined]
    outs = []  # (the stored dtype, its fragment type or None for f32)
    for buf in bufs:
        if buf.storage == "bf16n":
            kb.m.capability("BFloat16CooperativeMatrixKHR")
        outs.append((buf.dtype, None if buf.dtype == "f32"
                     else coopmat.Frag(kb, _ELEM[buf.dtype], "acc")))

    def finish(bi: Value, frow: Value, fcol: Value, x: coopmat.Fragment) -> None:
        base = bi * (m * n) + frow * n + fcol
        per_out: list[list[Value]] = [[] for _ in bufs]
        for e, v in enumerate(fragments.elements(fc, x, rm.length)):
            r, c = at.element_row(e), at.col(e)
            got = store.values((bi, frow + r, fcol + c), base + r * n + c, v)  # type: ignore
            for k, value in enumerate(got):
                per_out[k].append(round_to(kb, value, outs[k][0]))
        for buf, (_, ftype), values in zip(bufs, outs, per_out, strict=True):
            y = fragments.from_elements(fc, values)
            (ftype or fc).store(buf, base, ftype.convert(y) if ftype else y, n)

    return finish


def _reduce_slices(kb: KernelBuilder, cfg: MatmulConfig, p: dict, store: object, ws: Buffer,
                   tid: Value, row0: Value, col0: Value, z: Value, layout: tuple) -> None:
    """Split-K pass 1, on pass 0's grid: workgroup (tile, part) sums the slices' partials of
    1/split of the tile's rows (in slice order: deterministic), 4 columns per 16-byte load
    where each thread has at least 4 elements (else one), and finishes them through the
    epilogue store; likewise b's column sums. One workgroup per tile, looping over all of
    it, left a 384 x 384 weight gradient split 16 ways 9 workgroups for 9 MiB of partials."""
    mp, np_, cs_base, cs_len = layout
    tm, tn, split, batch = cfg.tm, cfg.tn, cfg.split, p["batch"]
    bi, part = z / split, z % split
    rows = tm // split  # of the tile, summed by this workgroup
    width = 4 if rows * tn >= 4 * cfg.threads else 1  # columns per thread and load
    src = kb.buffer_view(ws, "f32x4") if width == 4 else ws
    per = rows * tn // (width * cfg.threads)  # loads per thread and slice
    assert per >= 1 and per * width * cfg.threads == rows * tn, cfg  # `_splits` ensures it
    unroll = math.gcd(per, _REDUCE_UNROLL)  # their loads are in flight together
    with kb.loop(kb.u32(0), per, unroll) as t:
        for u in range(unroll):
            e = tid + (t + u) * cfg.threads
            row = row0 + part * rows + e / (tn // width)
            col = col0 + (e % (tn // width)) * width
            sums = None
            for s in range(split):  # np_ and col are multiples of 4: aligned vectors
                at = ((s * batch + bi) * mp + row) * np_ + col
                v = src.load(at / width if width > 1 else at)
                vals = [kb.extract(v, j) for j in range(width)] if width > 1 else [v]
                sums = vals if sums is None else [x + y for x, y in zip(sums, vals, strict=True)]
            for j, total in enumerate(sums):  # type: ignore[arg-type]
                _guarded_finish(kb, cfg, p, store, bi, row, col + j, total)
    side = ksum_side(p)
    if side:
        at = KSums.of(side, cfg, p, row0, col0)
        with kb.if_(at.first & (part == 0)), kb.loop(tid, at.tile, cfg.threads) as c:
            i = at.origin + c
            with kb.when(i < at.size if at.size % at.tile else None):
                total = ws.load(cs_base + i)
                for s in range(1, split):
                    total = total + ws.load(cs_base + s * cs_len + i)
                store.colsum.store(i, total)  # type: ignore[attr-defined]


def _colsum(kb: KernelBuilder, cfg: MatmulConfig, entries: list, tid: Value, at: KSums,
            put: object) -> None:
    """Fold the K-sum partials of b (or a) (entries: guard, place in a bk x tile array, value)
    through shared memory; the first workgroup of the row (column) puts each total
    (`put(index, t)`)."""
    sh = kb.shared("f32", cfg.bk * at.tile)
    for guard, plain, val in entries:
        with kb.when(guard):
            sh.store(plain, val)
    kb.barrier()
    with kb.if_(at.first), kb.loop(tid, at.tile, cfg.threads) as c:  # threads may be < tile
        i = at.origin + c
        with kb.when(i < at.size if at.size % at.tile else None):
            total = sh.load(c)
            for kk in range(1, cfg.bk):
                total = total + sh.load(c + kk * at.tile)
            put(i, total)  # type: ignore[operator]


_VARIANTS["coopmat"] = emit
CONFIG_CHOOSERS.append(choose)
