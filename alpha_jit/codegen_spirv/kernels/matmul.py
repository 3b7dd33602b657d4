"""The batched matmul kernel family: out[b] = a[b] @ b[b] over strided operands, f32 accumulation.

Why: GEMMs are most of a transformer step's FLOPs, and the lowering hands them over as views
(transposes, broadcast batches, offsets) so no operand is ever copied. The kernel is written once
as a tiled SIMT GEMM and specialised at generation time: tile and micro-tile sizes from the
device limits, the global->shared load order from the operand strides (so loads are coalesced
for row-major and transposed operands alike), and bounds checks only along the axes whose size
is not a multiple of the tile. `choose_config` is the single place that picks a variant from the
capabilities; the cooperative-matrix variant (matmul_coopmat.py) registers beside "simt" in
`_VARIANTS` and its heuristic in `CONFIG_CHOOSERS`.

Spec (family "matmul"), params as (key, value) pairs, exactly:
    ("batch", B), ("m", M), ("n", N), ("k", K),
    ("a", (dtype, offset, sb, sm, sk)), ("b", (dtype, offset, sb, sk, sn)), ("out_dtype", dtype)
    optional ("a_round", "bf16") / ("b_round", "bf16"): the operand is f32 data that the graph
    cast to bf16; the kernel rounds it on load (the cast's kernel and buffer are gone)
    optional ("epilogue", (inputs, exprs, outputs)): an elementwise region (the elementwise
    family's spec over the (B, M, N) iteration space, its expressions reading the accumulator as
    ("acc",)) that runs in the store: bias, GELU, residual add, output cast. It replaces the
    plain output; with ("acc_buffer", True) an f32 (B, M, N) binding still receives the sums
    (the CPU variant adds K chunks there and runs the epilogue after the last one).
    optional ("colsum_b", True) (batch 1): also the column sums of b as loaded, before any
    rounding, sum over kk of b[kk, j] -> f32 [N], the last binding: a bias gradient computed
    by the weight-gradient GEMM that reads the same dY (schedule/colsum.py). Or
    ("rowsum_a", True): the row sums of a, sum over kk of a[i, kk] -> f32 [M], the same way
    (a weight gradient computed as dY^T @ x, ir/passes/gemm_transpose.py).
    optional ("config", MatmulConfig.to_param()): the variant and tiling, chosen before
    generation (runtime/autotune.py); absent, `choose_config`'s heuristic decides. A coopmat
    config with split > 1 adds an f32 workspace binding last (`notes["workspace_bytes"]`).
a[bi, i, kk] is element offset + bi*sb + i*sm + kk*sk of binding 0, b[bi, kk, j] likewise of
binding 1 (strides in elements, any may be 0); then the epilogue's inputs, then the contiguous
(B, M, N) output (absent with an epilogue and no acc_buffer), then the epilogue's outputs.
Push constants (base_x, base_y, base_z) offset the workgroup ids when the grid is split over
several dispatches to respect maxComputeWorkGroupCount. The CPU "rows" variant adds k0: it splits
K over sequential dispatches (the runtime puts a barrier between the dispatches of one kernel),
the first writing its partial products, each later one adding its own to them.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..dsl import KernelBuilder, Value, cap, pack_push_constants
from ..kernel import Dispatch, KernelBinary, KernelSpec
from .elementwise import EpilogueStore, ScalarRule, round_to, storage_dtype

_U32 = 1 << 32


@dataclass(frozen=True)
class MatmulConfig:
    """One variant's shape: workgroup tile tm x tn, k-step bk (rows: the K chunk of one
    dispatch), micro-tile rm x rn per thread (coopmat: per subgroup of `lanes` threads)."""

    variant: str = "simt"
    tm: int = 64
    tn: int = 64
    bk: int = 16
    rm: int = 4  # 4x4 micro-tile: 16 accumulators, 8 shared loads per 16 FMAs
    rn: int = 4
    lanes: int = 1
    split: int = 1  # coopmat: K split over this many workgroups, then a reducing pass

    @property
    def threads(self) -> int:
        return (self.tm // self.rm) * (self.tn // self.rn) * self.lanes

    def label(self) -> str:
        """How profiles and plans name the variant."""
        if self.variant == "coopmat":
            return (f"coopmat {self.tm}x{self.tn}x{self.bk} subgroup {self.rm}x{self.rn}"
                    f" x{self.lanes}" + (f" split-k {self.split}" if self.split > 1 else ""))
        return f"{self.variant} {self.tm}x{self.tn}x{self.bk} micro {self.rm}x{self.rn}"

    def to_param(self) -> tuple:
        """The config as a spec param value ("config", ...): a tuned choice travels in the
        spec, so the kernel cache keys on it and generation stays deterministic."""
        return (self.variant, self.tm, self.tn, self.bk, self.rm, self.rn, self.lanes,
                self.split)

    def shared_bytes(self) -> int:
        if self.variant == "rows":
            return 4 * self.bk * self.tm
        return 4 * self.bk * (self.tm + 1 + self.tn + 1)  # +1: worst-case padding per operand


def coopmat_allowed() -> bool:
    """ALPHA_JIT_COOPMAT=0 keeps every GEMM on the portable SIMT tiles (for comparisons)."""
    return os.environ.get("ALPHA_JIT_COOPMAT", "1") != "0"


def _tile_for(size: int, biggest: int) -> int:
    # Smallest power-of-two tile >= size (at least 16), capped: small matrices waste no threads.
    return max(16, min(biggest, 1 << max(0, size - 1).bit_length()))


# Faster variants' heuristics, asked in order before the SIMT tiling (matmul_coopmat adds
# its own): each returns a config for the spec on the device, or None where it does not apply.
CONFIG_CHOOSERS: list[Callable[[dict, object], MatmulConfig | None]] = []


def choose_config(spec: KernelSpec, caps: object) -> MatmulConfig:
    """The extension point: pick the variant and its tiling from the spec and the device.

    A ("config", ...) param (the autotuner's measured choice) decides; else CPU devices get the
    "rows" variant, GPUs listing the operand types as cooperative matrices the "coopmat" one
    (`CONFIG_CHOOSERS`; not with ALPHA_JIT_COOPMAT=0), others the SIMT one."""
    p = dict(spec.params)
    if "config" in p:
        return MatmulConfig(*p["config"])
    m, n, k = p["m"], p["n"], p["k"]
    if coopmat_allowed():
        for chooser in CONFIG_CHOOSERS:
            found = chooser(p, caps)
            if found is not None:
                return found
    max_threads = min(int(cap(caps, "max_workgroup_invocations", 1024)),  # type: ignore
                      _axis0(cap(caps, "max_workgroup_size", 1024)))
    max_shared = int(cap(caps, "max_shared_memory", 32768))  # type: ignore[call-overload]
    if cap(caps, "device_type", None) == "cpu":
        rows = _cpu_config(p, max_threads, max_shared)
        if rows is not None:
            return rows
    big_tiles = math.ceil(m / 128) * math.ceil(n / 128) * p["batch"]
    # 8x8 micro-tiles (4 FMAs per shared load) win on H200 and CPU, given enough workgroups.
    if m >= 256 and n >= 256 and big_tiles >= 64:
        cfg = MatmulConfig(tm=128, tn=128, bk=8, rm=8, rn=8)
    else:  # small or skinny: smaller tiles keep enough workgroups busy and waste no threads
        cfg = MatmulConfig(tm=_tile_for(m, 64), tn=_tile_for(n, 64), bk=16 if k > 8 else 8)
    # Over a limit: grow the micro-tile first (same work, fewer threads), then shrink tiles.
    while cfg.threads > max_threads or cfg.shared_bytes() > max_shared:
        if cfg.threads > max_threads and cfg.rn < 8:
            cfg = MatmulConfig(cfg.variant, cfg.tm, cfg.tn, cfg.bk, cfg.rm, cfg.rn * 2)
        elif cfg.threads > max_threads and cfg.rm < 8:
            cfg = MatmulConfig(cfg.variant, cfg.tm, cfg.tn, cfg.bk, cfg.rm * 2, cfg.rn)
        elif cfg.bk > 4:
            cfg = MatmulConfig(cfg.variant, cfg.tm, cfg.tn, cfg.bk // 2, cfg.rm, cfg.rn)
        elif cfg.tm >= cfg.tn and cfg.tm > cfg.rm:
            cfg = MatmulConfig(cfg.variant, cfg.tm // 2, cfg.tn, cfg.bk, cfg.rm, cfg.rn)
        elif cfg.tn > cfg.rn:
            cfg = MatmulConfig(cfg.variant, cfg.tm, cfg.tn // 2, cfg.bk, cfg.rm, cfg.rn)
        else:
            raise ValueError(f"{spec.name}: no matmul tiling fits the device limits")
    return cfg


# FMAs per thread in one K chunk of the "rows" variant (tm * bk), all of them straight-line
# code: this bounds its module size (~14k words) whatever K is, since the driver's compile
# time grows with the module (K unrolled whole: 660k instructions, minutes on 2 cores).
# Measured on llvmpipe (2 cores), the 99 GEMMs of the default GPT step: K whole 185 ms,
# 512 FMAs per chunk 160 ms (215k words in all); 2048 (tm 32) 130 ms but 750k words.
_CPU_UNROLL = 512
_CPU_MAX_TM = 16  # rows per workgroup
_CPU_THREADS = 128  # columns per workgroup, one per thread: 64 took 181 ms


def _cpu_config(p: dict, max_threads: int, max_shared: int) -> MatmulConfig | None:
    """The barrier-light, loop-free "rows" variant for CPU devices (see `_emit_rows`), or None
    where it does not apply: a K split over dispatches adds partial sums in the output, so an
    output narrower than f32 gets them only when K fits one chunk.

    Measured on llvmpipe (2 cores): 4-10 GFLOP/s against 0.3-0.7 for the SIMT tiles, whose
    every shared/global load inside a loop costs a per-lane scalar loop there."""
    m, n, k, batch = p["m"], p["n"], p["k"], p["batch"]
    threads = max(8, min(_CPU_THREADS, max_threads, 1 << max(0, n - 1).bit_length()))
    tm = max(8, min(_CPU_MAX_TM, 1 << max(0, m - 1).bit_length()))
    while tm > 8 and math.ceil(m / tm) * math.ceil(n / threads) * batch < 8:
        tm //= 2  # enough workgroups to share between the cores
    kmax = max(1, min(_CPU_UNROLL, min(max_shared, 16384) // 4) // tm)
    chunks = math.ceil(k / kmax)
    if chunks > 1 and (p["out_dtype"] != "f32"
                       or ("epilogue" in p and not p.get("acc_buffer"))):
        return None
    bk = math.ceil(k / chunks)  # balanced chunks: K = 512 -> 16 x 32, K = 200 -> 7 x 29
    return MatmulConfig("rows", tm=tm, tn=threads, bk=bk, rm=tm, rn=1)


def needs_acc_buffer(params: tuple, caps: object) -> bool:
    """Whether a GEMM with an epilogue needs its f32 sums in memory on this device: the CPU
    variant splits K over dispatches and adds the chunks there. Lowering asks, so the buffer
    exists only where the variant uses it."""
    p = dict(params)
    if cap(caps, "device_type", None) != "cpu":
        return False
    probe = KernelSpec("matmul", "probe", tuple((k, v) for k, v in params if k != "epilogue")
                       + (("out_dtype", "f32"),))
    cfg = choose_config(probe, caps)
    return cfg.variant == "rows" and cfg.bk < p["k"]


def _axis0(v: object) -> int:
    return int(v[0] if isinstance(v, Sequence) else v)  # type: ignore[index, arg-type]


def workgroup_limits(caps: object) -> tuple[int, int, int]:
    """maxComputeWorkGroupCount per axis (a single number applies to all three)."""
    lim = cap(caps, "max_workgroup_count", (65535, 65535, 65535))
    if isinstance(lim, Sequence):
        return tuple(int(x) for x in lim)  # type: ignore[return-value]
    return (int(lim),) * 3  # type: ignore[call-overload]


def grid_plan(groups: Sequence[int], caps: object) -> list[tuple[tuple[int, int, int],
                                                                   tuple[int, int, int]]]:
    """[(counts, bases)] covering a 3-D workgroup grid, each count within the device limits."""
    lims = workgroup_limits(caps)
    if any(g == 0 for g in groups):
        return []
    axes = [[(min(lims[a], groups[a] - b), b) for b in range(0, groups[a], lims[a])]
            for a in range(3)]
    return [((x[0], y[0], z[0]), (x[1], y[1], z[1])) for z, y, x in
            itertools.product(axes[2], axes[1], axes[0])]


def in_tile_bounds(row: Value, col: Value, m: int, n: int, tm: int, tn: int) -> Value | None:
    """The guard of an output element: row < m and col < n, each only where the tile can
    overhang that axis; None where it never does."""
    conds = ([row < m] if m % tm else []) + ([col < n] if n % tn else [])
    return conds[0] & conds[1] if len(conds) == 2 else (conds[0] if conds else None)


def _u(kb: KernelBuilder, x: int) -> Value:
    # Strides may be negative in principle: u32 arithmetic wraps, so the final index is exact.
    return kb.u32(x % _U32)


def _push_fields(cfg: MatmulConfig) -> list[str]:
    """The variant's push constants, all u32: the grid-split bases, then k0 where K is split."""
    return ["base_x", "base_y", "base_z"] + (["k0"] if cfg.variant == "rows" else []) \
        + (["phase"] if cfg.split > 1 else [])


def ksum_side(p: dict) -> str | None:
    """The operand whose sums over K the spec asks for: "b" (colsum_b), "a" (rowsum_a)."""
    if p.get("colsum_b") and p.get("rowsum_a"):
        raise ValueError("a matmul spec asks for the K sums of one operand, not both")
    return "b" if p.get("colsum_b") else "a" if p.get("rowsum_a") else None


@dataclass(frozen=True, eq=False)  # Values compare into kernel code, not Python bools
class KSums:
    """Where the K sums of one operand go: its tile edge and first index in this workgroup,
    its length (M or N), and whether this workgroup stores them: b's sums are stored by the
    first workgroup of each column of workgroups (row0 == 0), a's by the first of each row
    (col0 == 0)."""

    tile: int
    origin: Value
    size: int
    first: Value

    @staticmethod
    def of(side: str, cfg: MatmulConfig, p: dict, row0: Value, col0: Value) -> KSums:
        if side == "b":
            return KSums(cfg.tn, col0, p["n"], row0 == 0)
        return KSums(cfg.tm, row0, p["m"], col0 == 0)


class _Store(EpilogueStore):
    """The GEMM's store over (batch, row, column), plus the K sums of b or a if asked."""

    def __init__(self, kb: KernelBuilder, p: dict, rule: ScalarRule | None):
        super().__init__(kb, p, rule, (p["batch"], p["m"], p["n"]), bool(p.get("acc_buffer")))
        self.side = ksum_side(p)
        self.colsum = kb.buffer("colsum", "f32", writable=True) if self.side else None


def _prologue(kb: KernelBuilder, cfg: MatmulConfig, p: dict, rule: ScalarRule | None) -> tuple:
    """What every variant declares first: bindings a, b and the store's (in the contract's
    order), the push constants, and this workgroup's first row/column and batch index."""
    abuf = kb.buffer("a", storage_dtype(p["a"][0]), writable=False)
    bbuf = kb.buffer("b", storage_dtype(p["b"][0]), writable=False)
    store = _Store(kb, p, rule)
    pc = kb.push_constants([(f, "u32") for f in _push_fields(cfg)])
    col0 = (kb.workgroup_id(0) + pc["base_x"]) * cfg.tn
    row0 = (kb.workgroup_id(1) + pc["base_y"]) * cfg.tm
    bi = kb.workgroup_id(2) + pc["base_z"]
    return abuf, bbuf, store, kb.local_index(), row0, col0, bi, pc


def _rounder(kb: KernelBuilder, dtype: str | None) -> Any:
    """The operand prologue: f32 data rounded on load to the `dtype` the graph cast it to
    ("bf16": nearest even, as the cast kernel it replaces stored it), or the value as is."""
    if dtype is None:
        return lambda v: v
    if dtype != "bf16":
        raise ValueError(f"matmul operand rounding to {dtype!r} is not supported")
    return lambda v: round_to(kb, v, "bf16")


def _emit_simt(kb: KernelBuilder, cfg: MatmulConfig, p: dict, rule: ScalarRule | None) -> None:
    """The tiled SIMT GEMM body: shared-memory tiles of a and b, a rm x rn micro-tile each."""
    m, n, k = p["m"], p["n"], p["k"]
    a_dt, a_off, a_sb, a_sm, a_sk = p["a"]
    b_dt, b_off, b_sb, b_sk, b_sn = p["b"]
    abuf, bbuf, store, tid, row0, col0, bi, _ = _prologue(kb, cfg, p, rule)
    tm, tn, bk, rm, rn, threads = cfg.tm, cfg.tn, cfg.bk, cfg.rm, cfg.rn, cfg.threads
    check_k = k % bk != 0

    def operand(buf, off, sb, s_outer, s_k, tile, size, name):
        """Per-thread load slots of one operand's (tile x bk) block: where it goes in shared
        memory and the k-independent part of its global address. k-fastest order when k is
        the operand's contiguous axis, so neighbouring threads read neighbouring elements."""
        k_fast = abs(s_k) < abs(s_outer) or (s_k != 0 and s_outer == 0)
        ld = tile + (1 if k_fast else 0)  # pad rows so k-fastest shared stores spread banks
        sh = kb.shared("f32", bk * ld)
        base = _u(kb, off) + bi * _u(kb, sb) if sb else _u(kb, off)
        slots = []
        for r in range(math.ceil(tile * bk / threads)):
            e = tid + r * threads
            kk, o = (e % bk, e / bk) if k_fast else (e / tile, e % tile)
            guard = (r + 1) * threads > tile * bk  # last round: some threads have no element
            g_o = (row0 if name == "a" else col0) + o
            if size % tile:  # clamp the row/column: its products are never stored anyway
                g_o = kb.fmin(g_o, size - 1)
            addr = base + g_o * _u(kb, s_outer) if s_outer else base
            slots.append((kk, kk * ld + o, addr, e < tile * bk if guard else None))
        return sh, ld, slots, buf, s_k, _rounder(kb, p.get(f"{name}_round"))

    ops = [operand(abuf, a_off, a_sb, a_sm, a_sk, tm, m, "a"),
           operand(bbuf, b_off, b_sb, b_sn, b_sk, tn, n, "b")]
    tx, ty = tid % (tn // rn), tid / (tn // rn)
    acc = [[kb.var("f32", 0.0) for _ in range(rn)] for _ in range(rm)]
    # K sums of b (or a): each load slot keeps a fixed column (row), so a running sum per slot
    side = 1 if store.side == "b" else 0
    csums = [kb.var("f32", 0.0) for _ in ops[side][2]] if store.colsum is not None else []
    with kb.loop(kb.u32(0), k, bk) as k0:
        for oi, (sh, _ld, slots, buf, s_k, rounded) in enumerate(ops):
            for si, (kk, sidx, addr, guard) in enumerate(slots):
                kg = k0 + kk
                if check_k:  # past K: load a valid element, store 0 (0 * anything finite)
                    kc = kb.fmin(kg, k - 1)
                    raw = kb.select(kg < k, buf.load(addr + kc * _u(kb, s_k)), 0.0)
                else:
                    raw = buf.load(addr + kg * _u(kb, s_k))
                v = rounded(raw)
                if oi == side and csums:
                    csums[si].set(csums[si].get() + raw)
                with kb.when(guard):
                    sh.store(sidx, v)
        kb.barrier()
        (a_sh, a_ld, *_), (b_sh, b_ld, *_) = ops
        sums = [[acc[r][c].get() for c in range(rn)] for r in range(rm)]
        for kk in range(bk):  # unrolled: bk * (rm + rn) shared loads, bk * rm * rn FMAs
            # Strided micro-tile (row ty + r*(tm/rm)): neighbouring threads, neighbouring words.
            av = [a_sh.load(ty + (kk * a_ld + r * (tm // rm))) for r in range(rm)]
            bv = [b_sh.load(tx + (kk * b_ld + c * (tn // rn))) for c in range(rn)]
            sums = [[kb.fma(av[r], bv[c], sums[r][c]) for c in range(rn)] for r in range(rm)]
        for r in range(rm):
            for c in range(rn):
                acc[r][c].set(sums[r][c])
        kb.barrier()  # everyone is done reading the tiles before the next step overwrites them
    if csums:
        _colsum_simt(kb, cfg, store, ops[side], csums, tid,
                     KSums.of(store.side, cfg, p, row0, col0))  # type: ignore[arg-type]
    out_base = bi * (m * n)
    for r in range(rm):
        row = row0 + ty + r * (tm // rm)
        for c in range(rn):
            col = col0 + tx + c * (tn // rn)
            with kb.when(in_tile_bounds(row, col, m, n, tm, tn)):
                store.finish((bi, row, col), out_base + row * n + col, acc[r][c].get())


def _colsum_simt(kb: KernelBuilder, cfg: MatmulConfig, store: _Store, op: tuple,
                 csums: list, tid: Value, at: KSums) -> None:
    """Fold the per-slot K sums through the operand's shared tile (a slot's place there is
    its column or row and k offset), and let the first workgroup of the line store them."""
    sh, ld, slots, *_ = op
    for (_kk, sidx, _addr, guard), cs in zip(slots, csums, strict=True):
        with kb.when(guard):
            sh.store(sidx, cs.get())
    kb.barrier()
    with kb.if_(at.first), kb.loop(tid, at.tile, cfg.threads) as c:  # threads may be < tile
        idx = at.origin + c
        with kb.when(idx < at.size if at.size % at.tile else None):
            total = sh.load(c)
            for kk in range(1, cfg.bk):
                total = total + sh.load(c + kk * ld)
            store.colsum.store(idx, total)  # type: ignore[union-attr]
    kb.barrier()


def _emit_rows(kb: KernelBuilder, cfg: MatmulConfig, p: dict, rule: ScalarRule | None) -> None:
    """Loop-free GEMM for CPU devices (llvmpipe): one K chunk of bk per dispatch, unrolled.

    A workgroup owns tm rows; each thread owns rn columns (col0 + tid + c * threads). The
    tm x bk block of a is staged in shared memory, then every a value is read at a
    compile-time-constant shared index outside any control flow, which llvmpipe turns into
    one scalar load broadcast to all lanes, while any other load (and this one inside a loop)
    costs a scalar load per lane. So a k step is rn per-lane loads of b and tm * rn FMAs
    against tm cheap loads. A loop over K would make every a load per-lane (10x slower), so
    K is split over sequential dispatches instead (push constant k0): the code is one chunk
    whatever K is. Chunks after the first add the output's partial sums to theirs."""
    m, n, k = p["m"], p["n"], p["k"]
    a_dt, a_off, a_sb, a_sm, a_sk = p["a"]
    b_dt, b_off, b_sb, b_sk, b_sn = p["b"]
    abuf, bbuf, store, tid, row0, col0, bi, pc = _prologue(kb, cfg, p, rule)
    a_round, b_round = _rounder(kb, p.get("a_round")), _rounder(kb, p.get("b_round"))
    tm, tn, bk, rn, threads = cfg.tm, cfg.tn, cfg.bk, cfg.rn, cfg.threads
    split, ragged = bk < k, k % bk != 0  # ragged: the last chunk is short
    k0 = pc["k0"]
    a_base = _u(kb, a_off) + bi * _u(kb, a_sb) if a_sb else _u(kb, a_off)
    b_base = _u(kb, b_off) + bi * _u(kb, b_sb) if b_sb else _u(kb, b_off)
    if split:
        a_base = a_base + k0 * _u(kb, a_sk) if a_sk else a_base
        b_base = b_base + k0 * _u(kb, b_sk) if b_sk else b_base
    left = k - k0 if ragged else None  # k steps from k0 to the end of K
    last = (math.ceil(k / bk) - 1) * bk  # where the last chunk starts

    def k_off(kk: Value | int, stride: int) -> Value:
        """Element offset of k step kk of this chunk (past the end of K: of the last k)."""
        if ragged:
            return kb.fmin(kb.value(kk, "u32"), left - 1) * _u(kb, stride)
        return kk * _u(kb, stride) if isinstance(kk, Value) else _u(kb, kk * stride)

    def in_k(kk: Value | int, v: Value) -> Value:
        """`v`, or 0 past the end of K."""
        return kb.select(kb.value(kk, "u32") < left, v, 0.0) if ragged else v

    b_cols = []
    for c in range(rn):
        g = col0 + (tid + c * threads)
        if n % tn:  # clamp: the column's results are never stored
            g = kb.fmin(g, n - 1)
        b_cols.append(b_base + g * _u(kb, b_sn) if b_sn else b_base)
    a_sh = kb.shared("f32", tm * bk)
    # a's row sums add the values as loaded: a copy before rounding where a is rounded
    a_raw = (kb.shared("f32", tm * bk) if p.get("a_round") else a_sh) \
        if store.side == "a" else None
    # Staging order: k fastest when k is a's contiguous axis (neighbouring lanes, neighbouring
    # words), else rows fastest.
    k_fast = abs(a_sk) < abs(a_sm) or (a_sk != 0 and a_sm == 0)
    for rnd in range(math.ceil(tm * bk / threads)):
        e = tid + rnd * threads
        r, kk = (e / bk, e % bk) if k_fast else (e % tm, e / tm)
        g = row0 + r
        if m % tm:
            g = kb.fmin(g, m - 1)
        raw = in_k(kk, abuf.load(a_base + g * _u(kb, a_sm) + k_off(kk, a_sk)))
        with kb.when(e < tm * bk if (rnd + 1) * threads > tm * bk else None):
            a_sh.store(r * bk + kk, a_round(raw))
            if a_raw is not None and a_raw is not a_sh:
                a_raw.store(r * bk + kk, raw)
    kb.barrier()
    if a_raw is not None:
        _row_sums_rows(kb, cfg, p, store, a_raw, tid, row0, col0, k0 if split else None)
    sums: list[list[Value | float]] = [[0.0] * rn for _ in range(tm)]
    csum: list[Value | float] = [0.0] * rn  # this thread's columns of b, summed over the chunk
    for kk in range(bk):
        off = k_off(kk, b_sk)
        raw = [in_k(kk, bbuf.load(b_cols[c] + off)) for c in range(rn)]
        bv = [b_round(v) for v in raw]
        if store.side == "b":
            csum = [v if isinstance(s_, float) else s_ + v for s_, v in zip(csum, raw,
                                                                            strict=True)]
        for r in range(tm):
            av = a_sh.load(kb.u32(r * bk + kk))
            for c in range(rn):
                s = sums[r][c]
                sums[r][c] = av * bv[c] if isinstance(s, float) else kb.fma(av, bv[c], s)
    if store.side == "b":
        for c in range(rn):
            col = col0 + (tid + c * threads)
            ok = row0 == 0
            if n % tn:
                ok = ok & (col < n)
            with kb.if_(ok):
                total = kb.var("f32", csum[c])
                if split:
                    with kb.if_(k0 != 0):
                        total.set(store.colsum.load(col) + csum[c])
                store.colsum.store(col, total.get())
    out_base = bi * (m * n)
    for r in range(tm):
        row = row0 + r
        for c in range(rn):
            col = col0 + (tid + c * threads)
            idx = out_base + row * n + col
            v = sums[r][c]
            v = kb.f32(v) if isinstance(v, float) else v
            with kb.when(in_tile_bounds(row, col, m, n, tm, tn)):
                _store_partial(kb, store, bi, row, col, idx, v, k0 if split else None, last)


def _row_sums_rows(kb: KernelBuilder, cfg: MatmulConfig, p: dict, store: _Store,
                   a_raw: Any, tid: Value, row0: Value, col0: Value, k0: Value | None) -> None:
    """The "rows" variant's row sums of a over this K chunk (staged as loaded: zeros past K),
    added to the earlier chunks' by the first column of workgroups."""
    tm, bk = cfg.tm, cfg.bk
    with kb.if_(col0 == 0), kb.loop(tid, tm, cfg.threads) as r:
        row = row0 + r
        with kb.when(row < p["m"] if p["m"] % tm else None):
            total = kb.var("f32", a_raw.load(r * bk))
            for kk in range(1, bk):
                total.set(total.get() + a_raw.load(r * bk + kk))
            if k0 is not None:
                with kb.if_(k0 != 0):
                    total.set(store.colsum.load(row) + total.get())  # type: ignore[union-attr]
            store.colsum.store(row, total.get())  # type: ignore[union-attr]


def _store_partial(kb: KernelBuilder, store: _Store, bi: Value, row: Value, col: Value,
                   idx: Value, v: Value, k0: Value | None, last: int) -> None:
    """out[idx] = v, plus the sums of the earlier K chunks when this is not the first one;
    an epilogue runs on the total after the last chunk (chunk `last` starts there)."""
    if k0 is None:
        store.finish((bi, row, col), idx, v)
        return
    out = store.out
    assert out is not None  # a split K always has the f32 accumulator binding
    total = kb.var("f32", v)
    with kb.if_(k0 != 0):
        total.set(out.load(idx) + v)
    if store.epilogue is None:
        out.store(idx, total.get())
        return
    with kb.if_(k0 != last):
        out.store(idx, total.get())
    with kb.if_(k0 == last):
        store.finish((bi, row, col), idx, total.get())


_VARIANTS: dict[str, Callable[[KernelBuilder, MatmulConfig, dict, ScalarRule | None], None]] = {
    "simt": _emit_simt,
    "rows": _emit_rows,
}


def generate_matmul(spec: KernelSpec, caps: object = None,
                    scalar_rule: ScalarRule | None = None) -> KernelBinary:
    """SPIR-V for one batched strided matmul (see the module docstring for the spec);
    `scalar_rule`: the IR's, for an epilogue's expressions."""
    p = dict(spec.params)
    for key in ("batch", "m", "n", "k", "a", "b", "out_dtype"):
        if key not in p:
            raise ValueError(f"{spec.name}: matmul spec lacks {key!r}")
    cfg = choose_config(spec, caps)
    kb = KernelBuilder(spec.name, cfg.threads, caps)
    _VARIANTS[cfg.variant](kb, cfg, p, scalar_rule)
    groups = (math.ceil(p["n"] / cfg.tn), math.ceil(p["m"] / cfg.tm), p["batch"])
    # one pass over the grid per K chunk, in K order ("rows" only; the others take K whole)
    k_starts = [(k0,) for k0 in range(0, p["k"], cfg.bk)] if "k0" in _push_fields(cfg) else [()]
    if cfg.split > 1:  # split-K: the slices' partial sums (z: batch x slice), then their sum
        passes = [((*groups[:2], groups[2] * cfg.split), (phase,)) for phase in (0, 1)]
    else:
        passes = [(groups, k0) for k0 in k_starts]
    dispatches = [Dispatch(cnt, pack_push_constants([("u32", v) for v in (*base, *extra)]))
                  for grid, extra in passes for cnt, base in grid_plan(grid, caps)]
    label = cfg.label()
    if cfg.variant == "coopmat":
        label += {"direct": " direct store", "fragments": " fragment store",
                  "vectors": " vector store", "scratch": ""}[
                      matmul_coopmat.store_path(cfg, p, caps)]
    notes = {"config": cfg, "variant": label,
             "flops": 2 * p["batch"] * p["m"] * p["n"] * p["k"]}
    if cfg.split > 1:
        notes["workspace_bytes"] = matmul_coopmat.workspace_bytes(p, cfg)
    if cfg.lanes > 1 and cap(caps, "subgroup_size_control", False):
        notes["required_subgroup_size"] = cfg.lanes  # fragments are written for this size
    return kb.binary(spec, dispatches, notes=notes)


from . import matmul_coopmat  # noqa: E402, F401  (registers the "coopmat" variant)
