"""Flash attention on cooperative matrices: the tensor-core variant of the three attention
families (forward, dq, dk/dv), same specs, bindings and grid as the SIMT kernels.

Why: the SIMT flash kernels multiply at 4-9 TFLOP/s on the H200 and were half of a bf16 GPT
step; their four products per tile (S = q k^T, dP = dO v^T, then P v or dS k, and for dk/dv
P^T dO and dS^T q) are GEMMs of 16-row blocks that tensor cores run an order of magnitude
faster, while what needs a row and a column (mask, softmax, dropout, dS = P (dP - D)) is a
small elementwise step between them.

Shape of the work. A workgroup has `subgroups` subgroups of `lanes` lanes; each subgroup owns
16 rows: query rows (forward, dq) or key rows (dk/dv); the register forward and dq
(attention_registers.py) may own two 16-row blocks (`CmConfig.row_blocks`), each streamed B
fragment then feeding both blocks' products.
- The subgroup's own operands (q, and dO for dq; k and v for dk/dv) are staged once through
  its 16-bit tile into A fragments that stay in registers.
- The workgroup streams tiles of `block` keys (forward, dq) or queries (dk/dv) through shared
  memory, 16 bytes per load, rows past T zero; f32 dO is rounded to the fragment type as it is
  staged (dO is an operand of the products, as under PyTorch's autocast).
- Each product of the subgroup's 16 rows with the tile is stored as f32 to the subgroup's
  scratch; its lanes (lanes / 16 per row, 8 adjacent columns at a time) apply the scale, the
  mask, the online softmax (forward) or exp(S - lse), dropout and dS, and write P and dS as
  16-bit A fragments to the subgroup's tile.
- Those multiply the streamed tile: the forward's P v lands in scratch and is added to f32
  registers that the lanes rescale per tile; dq, dk and dv stay in accumulator fragments
  until the end, when they leave through scratch to the same outputs as the SIMT kernels.
Masked tiles (the causal diagonal, ragged T) give exactly 0 probability to what a row may not
see. One difference from the SIMT kernels: there a masked position's operand values are
selected away, here they still enter the fragment products as 0 * x, so an inf or NaN stored
in k, v, q or dO at a position a row may not see turns that row's result NaN (PyTorch's
kernels do the same); finite values give the same results.

Applies where the device lists bf16 (or f16) x -> f32 at 16x16x16 for the operands' type, hd is
a multiple of 16, and q, k, v (and dO) have a contiguous head dim and 16-byte aligned rows;
else, or with ALPHA_JIT_COOPMAT=0, the SIMT kernels run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

from .. import coopmat
from ..dsl import KernelBuilder, SharedArray, Value, cap
from ..kernel import KernelBinary, KernelSpec
from ..scalar import ScalarEmitter, ieee_div, nan_minmax
from . import attention as A
from .matmul import coopmat_allowed

_F = 16  # fragment edge
_VEC = 8  # 16-bit elements per 16-byte vector
_ELEM = {"bf16": "bf16n", "f16": "f16"}
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class CmConfig:
    subgroups: int
    lanes: int
    block: int  # keys (forward, dq) or queries (dk/dv) per streamed tile
    # 16-row blocks per subgroup (register forward and dq): each B fragment loaded from shared
    # memory feeds that many products
    row_blocks: int = 1

    @property
    def rows(self) -> int:
        return _F * self.row_blocks * self.subgroups

    @property
    def threads(self) -> int:
        return self.subgroups * self.lanes

    @property
    def lpr(self) -> int:  # lanes per row in the elementwise step
        return self.lanes // _F


def _aligned(entry: tuple) -> bool:
    dt, off, strides = entry
    vec = 4 if dt == "f32" else _VEC  # 16 bytes
    return strides[3] == 1 and all(x % vec == 0 for x in (off, *strides[:3]))


def shared_bytes(family: str, cfg: CmConfig, hd: int, registers: bool = False) -> int:
    """Workgroup memory: two streamed 16-bit tiles (+ lse and D of dk/dv's queries), and per
    subgroup its 16-bit tiles, f32 scratch and (forward) row statistics. The register-softmax
    kernels (attention_registers.py) keep one 16-bit tile and the output's scratch."""
    bl, dkdv = cfg.block, family == "attention_dkdv"
    # dk/dv: lse, D and D's partial sums (8 elements each) of the query tile
    tiles = 2 * bl * (hd + _VEC) * 2 + ((2 + hd // _VEC) * bl * 4 if dkdv else 0)
    return tiles + cfg.subgroups * _Layout(family, cfg, hd, registers).bytes_per_subgroup()


@dataclass(frozen=True)
class _Layout:
    """A subgroup's share of workgroup memory: its 16-bit tiles and its f32 scratch."""

    family: str
    cfg: CmConfig
    hd: int
    registers: bool

    @property
    def n16(self) -> int:  # dk/dv's P and dS, or one tile for the staged operands
        return 2 if self.family == "attention_dkdv" and not self.registers else 1

    @property
    def wide(self) -> int:  # a 16-bit tile's row, in 16-byte vectors
        return (max(self.cfg.block, self.hd) + _VEC) // _VEC

    @property
    def scr_floats(self) -> int:
        if self.registers:
            return _F * (self.hd + 4)  # the outputs leave through it
        regions = 1 if self.family == "attention_fwd" else 2
        return max(regions * _F * (self.cfg.block + 4), _F * (self.hd + 4))

    def bytes_per_subgroup(self) -> int:
        stats = 0 if self.registers or self.family != "attention_fwd" \
            else 4 * 2 * _F * self.cfg.lpr
        return self.n16 * _F * self.wide * 16 + 4 * self.scr_floats + stats


def choose(family: str, p: dict, caps: object, registers: bool = False) -> CmConfig | None:
    """The tiling for this spec on the device, or None where the variant does not apply. The
    lowering records ALPHA_JIT_COOPMAT in the spec ("coopmat", bool), so cached kernels follow
    it; a spec without it (a test's) reads the variable."""
    elem = _ELEM.get(p["q"][0])
    if not p.get("coopmat", coopmat_allowed()) or elem is None \
            or not coopmat.supported(caps, elem):
        return None
    names = ("q", "k", "v") + (() if family == "attention_fwd" else ("do", "o"))
    for n in names:
        if p[n][0] != p["q"][0] and not (n in ("do", "o") and p[n][0] == "f32"):
            return None
        if not _aligned(p[n]):
            return None
    lanes, hd = coopmat.subgroup_size(caps), p["hd"]
    if lanes is None or lanes % _F or hd % _F or hd % (_VEC * (lanes // _F)):
        return None
    max_threads = int(cap(caps, "max_workgroup_invocations", 1024))  # type: ignore[arg-type]
    max_shared = int(cap(caps, "max_shared_memory", 32768))  # type: ignore[call-overload]
    long_walk = registers and family != "attention_dkdv" and p["t"] > 512
    # the register forward and dq over long causal walks: 32-key tiles (H200, T 1024, blocks
    # on the grid's slowest axis: forward 177 against 286 us, dq 177 against 234; T 256: 64
    # keys, 78 against 86 and 90 against 101); the forward's best there is two row blocks per
    # subgroup with 64-key tiles (156 us; with 32-key tiles 302, and dq's best two-block tiling
    # 276). Non-causal walks were not measured: the forward keeps its earlier 32-key tiles
    causal = long_walk and p["causal"]
    tilings = [(4, 64, 2)] if causal and family == "attention_fwd" and hd <= 64 else []
    blocks = (32, 16) if causal or (long_walk and family == "attention_fwd") else (64, 32, 16)
    tilings += [(subgroups, block, 1) for subgroups in (4, 2) for block in blocks]
    for subgroups, block, row_blocks in tilings:
        cfg = CmConfig(subgroups, lanes, block, row_blocks)
        if block % (_VEC * cfg.lpr) or cfg.rows % block or cfg.threads > max_threads:
            continue
        if shared_bytes(family, cfg, hd, registers) <= max_shared:
            return cfg
    return None


def _pack8(kb: KernelBuilder, elem: str, xs: list[Value]) -> Value:
    """Eight f32 values as one u32x4 of 16-bit elements (bf16 rounded to nearest even)."""
    def bits(x: Value) -> Value:
        if elem == "bf16n":
            return kb.bf16_bits(x)
        return kb.cast(kb.bitcast(kb.cast(x, "f16"), "u16"), "u32")

    b = [bits(x) for x in xs]
    return kb.vector("u32x4", [b[2 * i] | (b[2 * i + 1] << 16) for i in range(4)])


class _Rows:
    """A strided [B, heads, T, hd] input read 8 elements per load: 16 bytes of 16-bit data,
    or 32 of f32 rounded to the fragment type."""

    def __init__(self, kb: KernelBuilder, op: A._Operand, dt: str, elem: str):
        self.kb, self.op, self.elem, self.round = kb, op, elem, dt == "f32"
        self.view = kb.buffer_view(op.buf, "f32x4" if self.round else "u32x4")

    def _at(self, base: Value, row: Value, c: Value) -> Value:
        return base + row * A._u(self.kb, self.op.strides[2]) + c * _VEC

    def _f32x8(self, at: Value) -> list[Value]:
        kb, q = self.kb, at >> 2
        return [kb.extract(self.view.load_raw(q + h), i) for h in (0, 1) for i in range(4)]

    def load8(self, base: Value, row: Value, c: Value) -> Value:
        """Elements c*8 .. c*8 + 8 of a row, packed 16-bit (the fragment type)."""
        at = self._at(base, row, c)
        if not self.round:
            return self.view.load_raw(at >> 3)
        return _pack8(self.kb, self.elem, self._f32x8(at))

    def load8_f32(self, base: Value, row: Value, c: Value) -> list[Value]:
        """The same elements as f32 values of the fragment type: f32 data rounded as `load8`
        rounds it (D = dO . O then matches the rounded dO that dP is multiplied from, so a row
        of dS sums to 0 as closely as the 16-bit products allow)."""
        kb, at = self.kb, self._at(base, row, c)
        if self.round:
            if self.elem == "bf16n":
                return [kb.bitcast(kb.bf16_bits(x) << 16, "f32") for x in self._f32x8(at)]
            return [kb.cast(kb.cast(x, "f16"), "f32") for x in self._f32x8(at)]
        vec = self.view.load_raw(at >> 3)
        out = []
        for i in range(_VEC):
            word = kb.extract(vec, i // 2)
            if self.elem == "bf16n":
                out.append(kb.bitcast(word & 0xFFFF0000 if i % 2 else word << 16, "f32"))
            else:
                half = kb.cast(word >> 16 if i % 2 else word & 0xFFFF, "u16")
                out.append(kb.cast(kb.bitcast(half, "f16"), "f32"))
        return out


class _Staging:
    """Rows of one operand on their way to a shared tile: `fetch(r0)` loads rows r0 .. into
    registers (8 elements each), `stash(r0)` stores them (rows past T as zeros). Between the
    two the loads are in flight: a tile fetched before the math of the previous one lands
    while it runs (the H200's forward and dq kernels ran 12-25% faster)."""

    def __init__(self, k: _Kernel, name: str, base: Value, nrows: int, dst: SharedArray,
                 dst0: Value, ld: int, idx: Value, count: int):
        kb, per = k.kb, k.hd // _VEC
        self.k, self.name, self.base, self.dst = k, name, base, dst
        total = nrows * per
        self.slots = []  # (row, column vector, shared index, guard)
        for r in range(math.ceil(total / count)):
            v = idx + r * count
            row, col = v / per, v % per
            self.slots.append((row, col, dst0 + row * ld + col,
                               v < total if (r + 1) * count > total else None))
        self.regs = [kb.var("u32x4") for _ in self.slots]

    def fetch(self, r0: Value) -> None:
        kb, t = self.k.kb, self.k.p["t"]
        for (row, col, _at, guard), reg in zip(self.slots, self.regs, strict=True):
            with kb.when(guard):
                reg.set(self.k.rows[self.name].load8(self.base, kb.fmin(r0 + row, t - 1), col))

    def stash(self, r0: Value) -> None:
        kb, t = self.k.kb, self.k.p["t"]
        for (row, _col, at, guard), reg in zip(self.slots, self.regs, strict=True):
            with kb.when(guard):
                self.dst.store(at, kb.select(r0 + row < t, reg.get(), kb.null("u32x4")))


class _Kernel:
    """What the three families share: bindings, the streamed tiles, the subgroup's 16-bit
    tiles and f32 scratch, fragment types, and the lane's place in the elementwise step."""

    def __init__(self, spec: KernelSpec, caps: object, cfg: CmConfig, family: str,
                 inputs: tuple[str, ...], outputs: list[tuple[str, str]],
                 registers: bool = False):
        p = dict(spec.params)
        self.p, self.cfg, self.hd, self.bl = p, cfg, p["hd"], cfg.block
        self.elem = _ELEM[p["q"][0]]
        c, self.ins, self.outs = A._prologue(
            spec, caps, A.AttnConfig(cfg.rows, cfg.block), inputs, outputs,
            threads=cfg.threads, setup=lambda kb: coopmat.enable(kb, self.elem))
        kb = self.kb = c.kb
        self.c = c
        self.rows = {n: _Rows(kb, self.ins[n], p[n][0], self.elem)
                     for n in ("q", "k", "v", "do", "o") if n in self.ins}
        hd, bl = self.hd, self.bl
        self.ldt = (hd + _VEC) // _VEC  # a streamed tile's row, in 16-byte vectors
        self.tiles = kb.shared("u32x4", 2 * bl * self.ldt)
        lay = _Layout(family, cfg, hd, registers)
        self.n16, self.wide, self.scr_floats = lay.n16, lay.wide, lay.scr_floats
        self.own = kb.shared("u32x4", cfg.subgroups * self.n16 * _F * self.wide)
        self.scr = kb.shared("f32x4", cfg.subgroups * self.scr_floats // 4)
        self.sg = kb.subgroup_id()  # fragments belong to the hardware subgroup
        self.lane = kb.subgroup_invocation_id()
        self.r, self.slot = self.lane / cfg.lpr, self.lane % cfg.lpr
        self.fa = coopmat.Frag(kb, self.elem, "a")
        self.fb = coopmat.Frag(kb, self.elem, "b")
        self.fc = coopmat.Frag(kb, "f32", "acc")
        self.row0 = c.blk0 + self.sg * (_F * cfg.row_blocks)  # the subgroup's first row

    def block_row0(self, rb: int) -> Value:
        """The first row of the subgroup's 16-row block rb."""
        return self.row0 + rb * _F if rb else self.row0

    # -- staging ------------------------------------------------------------------------------
    def _stage(self, name: str, base: Value, r0: Value, nrows: int, dst: SharedArray,
               dst0: Value, ld: int, idx: Value, count: int) -> None:
        """Rows r0 .. r0 + nrows of operand `name` into dst (row stride ld vectors) by
        `count` invocations numbered idx; rows past T are zero."""
        st = _Staging(self, name, base, nrows, dst, dst0, ld, idx, count)
        st.fetch(r0)
        st.stash(r0)

    def stream(self, names: tuple[tuple[str, Value], ...]) -> list[_Staging]:
        """Streamed tiles 0, 1, ... of operands (name, base), through registers: `fetch` the
        next tile while the current one is multiplied, `stash` it after the barrier."""
        return [_Staging(self, name, base, self.bl, self.tiles,
                         self.kb.u32(n * self.bl * self.ldt), self.ldt, self.c.tid,
                         self.cfg.threads) for n, (name, base) in enumerate(names)]

    def kv_walk(self, kbase: Value, vbase: Value) -> tuple:
        """The key/value tiles a query block streams (forward, dq): (own_end, the k and v
        stagings with tile 0 fetched, walk_end). The walk is contiguous: full tiles from 0 to
        walk_end, then (causal) the diagonal ones up to own_end(), or the ragged last one."""
        kb, t = self.kb, self.p["t"]
        own_end = (lambda: kb.fmin(self.c.blk0 + self.cfg.rows, kb.u32(t))) \
            if self.p["causal"] else None
        kv = self.stream((("k", kbase), ("v", vbase)))
        walk_end = own_end() if own_end is not None else kb.u32(t)
        for st in kv:
            st.fetch(kb.u32(0))
        return own_end, kv, walk_end

    def kv_next(self, kv: list, j0: Value, walk_end: Value) -> None:
        """Tile j0 of the walk into shared memory, and the next one's loads in flight."""
        kb = self.kb
        kb.barrier()  # the previous tile's readers are done
        for st in kv:
            st.stash(j0)
        kb.barrier()
        with kb.if_(j0 + self.bl < walk_end):  # the next tile's loads overlap this one's math
            for st in kv:
                st.fetch(j0 + self.bl)

    def dkdv_element(self, hh: Value, ii: Value, j: Value, col: Value, x: Value, dp: Value,
                     lse_sh: SharedArray, dd_sh: SharedArray, masked: bool) -> tuple:
        """(P, dS) of query ii (tile column col) and key j in dk/dv, from S = x and dP = dp:
        P = exp(S * scale - lse), dS = P (dP - D), dropout applied, masked to 0 where key j
        is not visible to query ii."""
        kb, p = self.kb, self.p
        pr = kb.exp(x * p["scale"] - lse_sh.load(col))
        kr = self.c.keep(hh, ii, j)  # dropout: dV takes the dropped P, dS the dropped dP
        d = pr * ((dp if kr is None else dp * kr) - dd_sh.load(col))
        pr = pr if kr is None else pr * kr
        if masked:  # key j visible to query ii (inside T, not in its future)
            t = p["t"]
            ok = (ii < t) & (j <= ii) if p["causal"] else ii < t
            pr, d = kb.select(ok, pr, 0.0), kb.select(ok, d, 0.0)
        return pr, d

    def dq_element(self, row: Value, key: Value, x: Value, dp: Value, lse: Value, dd: Value,
                   masked: bool) -> Value:
        """dS of query `row` and `key` in dq, from S = x and dP = dp: P = exp(S * scale - lse),
        dS = P (dP - D) with dropout, 0 where the key is not visible (masked tiles)."""
        kb, c = self.kb, self.c
        pj = kb.exp(x * self.p["scale"] - lse)
        kj = c.keep(c.head, row, key)  # dropout scales dP as it scaled P
        d = pj * ((dp if kj is None else dp * kj) - dd)
        return kb.select(A._allowed(c, key, row), d, 0.0) if masked else d

    def add_dq(self, da: list, acc: list) -> None:
        """dq += dS k for one key tile (dS as A fragments; da[rb] and acc[rb] per row block
        where the subgroup has several)."""
        if self.cfg.row_blocks == 1:
            da, acc = [da], [acc]
        for n in range(self.hd // _F):
            outs = self.products(da, 0, n * _F, False, [a[n].get() for a in acc])
            for a, x in zip(acc, outs, strict=True):
                a[n].set(x)

    def finish_dq(self, spec: KernelSpec, caps: object, body, own_end, acc: list, what: str
                  ) -> KernelBinary:
        """Walk the key tiles (full ones, then the diagonal or ragged ones masked), dq (times
        scale) out through the scratch, and the dq kernel's binary."""
        c, p, t = self.c, self.p, self.p["t"]
        m_lo, m_hi, f_lo, f_hi = A._masked_ranges(c, own_end)
        A._loop_tiles(c, f_lo, f_hi, lambda j0: body(j0, False), t)
        A._loop_tiles(c, m_lo, m_hi, lambda j0: body(j0, True), self.cfg.rows)
        for rb, blk in enumerate([acc] if self.cfg.row_blocks == 1 else acc):
            if rb:
                coopmat.subgroup_barrier(self.kb)  # the scratch read before it is rewritten
            self.write_out([a.get() for a in blk], self.outs["dq"], p["h"], c.head, p["scale"],
                           rb)
        flops = 6 * p["b"] * p["h"] * t * t * p["hd"] // (2 if p["causal"] else 1)
        return self.binary(spec, caps, p["h"], flops, what)

    def stage_queries(self, hh: Value, i0: Value, lse_sh: SharedArray, dd_sh: SharedArray,
                      part_sh: SharedArray) -> None:
        """dk/dv: query tile i0 of head hh (q and dO) into the streamed tiles, its rows' lse
        and D into shared memory, between barriers."""
        kb, c = self.kb, self.c
        kb.barrier()
        self.stage_tile(0, "q", self.ins["q"].base(c.bi, hh), i0)
        self.stage_tile(1, "do", self.ins["do"].base(c.bi, hh), i0)
        self.row_stats(hh, i0, lse_sh, dd_sh, part_sh)
        kb.barrier()

    def add_dkdv(self, pa: list, sa: list, dk: list, dv: list) -> None:
        """dv += P^T dO and dk += dS^T q for one query tile (P and dS as A fragments)."""
        for n in range(self.hd // _F):
            dv[n].set(self.product(pa, 1, n * _F, False, dv[n].get()))
            dk[n].set(self.product(sa, 0, n * _F, False, dk[n].get()))

    def finish_dkdv(self, spec: KernelSpec, caps: object, dk: list, dv: list, what: str
                    ) -> KernelBinary:
        """dk (times scale) and dv out through the scratch, and the dk/dv kernel's binary."""
        p = self.p
        for name, accs, mul in (("dk", dk, p["scale"]), ("dv", dv, 1.0)):
            if name in self.outs:
                self.write_out([a.get() for a in accs], self.outs[name], p["hkv"], self.c.head,
                               mul)
                coopmat.subgroup_barrier(self.kb)  # scratch read before the next output lands
        t = p["t"]
        flops = 8 * p["b"] * p["h"] * t * t * p["hd"] // (2 if p["causal"] else 1)
        return self.binary(spec, caps, p["hkv"], flops, what)

    def stage_tile(self, n: int, name: str, base: Value, r0: Value) -> None:
        """Streamed tile n (0 or 1): `block` rows of `name` from r0 (the caller barriers)."""
        self._stage(name, base, r0, self.bl, self.tiles, self.kb.u32(n * self.bl * self.ldt),
                    self.ldt, self.c.tid, self.cfg.threads)

    def _dot8(self, ob: Value, dob: Value, row: Value, col: Value) -> Value:
        """The dot product of dO and O over elements col*8 .. col*8 + 8 of a row."""
        kb = self.kb
        xs = self.rows["o"].load8_f32(ob, row, col)
        ys = self.rows["do"].load8_f32(dob, row, col)
        return reduce(lambda a, xy: kb.fma(xy[0], xy[1], a), zip(xs[1:], ys[1:], strict=True),
                      xs[0] * ys[0])

    def row_d(self, row: Value) -> Value:
        """D = dO . O of one row (clamped by the caller) of the workgroup's head."""
        c = self.c
        ob, dob = self.ins["o"].base(c.bi, c.head), self.ins["do"].base(c.bi, c.head)
        return _sum([self._dot8(ob, dob, row, self.kb.u32(x)) for x in range(self.hd // _VEC)])

    def row_stats(self, hh: Value, i0: Value, lse_sh: SharedArray, dd_sh: SharedArray,
                  part_sh: SharedArray) -> None:
        """lse and D = dO . O of query rows i0 .. i0 + block of head hh into shared arrays
        (0 past T): D's 8-element partial dot products by every invocation, 16 bytes per load,
        then summed per row (the caller barriers after)."""
        kb, c, t, bl, per = self.kb, self.c, self.p["t"], self.bl, self.hd // _VEC
        ob, dob = self.ins["o"].base(c.bi, hh), self.ins["do"].base(c.bi, hh)
        total, threads = bl * per, self.cfg.threads
        for k in range(math.ceil(total / threads)):
            v = c.tid + k * threads
            with kb.when(v < total if (k + 1) * threads > total else None):
                row = kb.fmin(i0 + v / per, t - 1)
                part_sh.store(v, self._dot8(ob, dob, row, v % per))
        kb.barrier()
        with kb.if_(c.tid < bl):
            ii = i0 + c.tid
            inside = ii < t
            lse = self.ins["lse"].at(self.ins["lse"].base(c.bi, hh), kb.fmin(ii, t - 1))
            dd = _sum([part_sh.load(c.tid * per + x) for x in range(per)])
            lse_sh.store(c.tid, kb.select(inside, lse, 0.0))
            dd_sh.store(c.tid, kb.select(inside, dd, 0.0))

    def _own0(self, slot: int) -> Value:
        return (self.sg * self.n16 + slot) * (_F * self.wide)

    def own_fragments(self, name: str, base: Value, rb: int = 0) -> list[coopmat.Fragment]:
        """The subgroup's 16 rows of `name` (its row block rb) as hd / 16 A fragments
        (through its tile 0)."""
        kb = self.kb
        self._stage(name, base, self.block_row0(rb), _F, self.own, self._own0(0), self.wide,
                    self.lane, self.cfg.lanes)
        coopmat.subgroup_barrier(kb)
        frags = [self.fa.load(self.own, self._own0(0) + kk * (_F // _VEC), self.wide)
                 for kk in range(self.hd // _F)]
        coopmat.subgroup_barrier(kb)  # loaded before the tile is written again
        return frags

    # -- fragments ----------------------------------------------------------------------------
    def tile_b(self, n: int, row: int, col: int, transposed: bool) -> coopmat.Fragment:
        """A B fragment of streamed tile n: rows row.. (of the tile) x columns col.. (of hd)
        as K x N, or transposed (K = hd columns, N = tile rows), which loads column-major."""
        idx = n * self.bl * self.ldt + row * self.ldt + col // _VEC
        return self.fb.load(self.tiles, self.kb.u32(idx), self.ldt, column_major=transposed)

    def own_a(self, slot: int, col: int) -> coopmat.Fragment:
        """The A fragment of the subgroup's tile `slot` at column col."""
        return self.fa.load(self.own, self._own0(slot) + col // _VEC, self.wide)

    def product(self, a: list[coopmat.Fragment], n: int, col: int, transposed: bool,
                acc: coopmat.Fragment | None = None) -> coopmat.Fragment:
        """acc + the subgroup's A fragments (along K) times streamed tile n's B fragments at
        column `col` of the product."""
        return self.products([a], n, col, transposed, [acc])[0]

    def products(self, a: list[list[coopmat.Fragment]], n: int, col: int, transposed: bool,
                 accs: list[coopmat.Fragment | None] | None = None) -> list[coopmat.Fragment]:
        """`product` for several row blocks' A fragments (a[rb] along K), each B fragment
        loaded once for all of them: shared-memory loads per product are what bound these
        kernels, one per product with a single row block."""
        xs = [self.fc.zero() if x is None else x for x in (accs or [None] * len(a))]
        for kk in range(len(a[0])):
            b = self.tile_b(n, col, kk * _F, True) if transposed else \
                self.tile_b(n, kk * _F, col, False)
            xs = [self.fc.mul_add(blk[kk], b, x) for blk, x in zip(a, xs, strict=True)]
        return xs

    # -- scratch --------------------------------------------------------------------------------
    def _scr(self, at: int, row: Value | int) -> Value:
        """The f32x4 index of the subgroup's scratch float `at` + row (a multiple of 4)."""
        return self.sg * (self.scr_floats // 4) + row + at // 4

    def store_scratch(self, x: coopmat.Fragment, region: int, ld: int, col: int) -> None:
        self.fc.store(self.scr, self._scr(region + col, 0), x, ld // 4)

    def read8(self, region: int, ld: int, c0: Value) -> list[Value]:
        """The lane's row, columns c0 .. c0 + 8, of a scratch region."""
        kb = self.kb
        at = self._scr(region, self.r * (ld // 4)) + c0 / 4
        return [kb.extract(self.scr.load(at + h), i) for h in (0, 1) for i in range(4)]

    def groups(self, width: int) -> list[Value]:
        """First columns of the lane's 8-column groups of a row `width` wide."""
        step = _VEC * self.cfg.lpr
        return [self.slot * _VEC + g * step for g in range(width // step)]

    def write16(self, slot: int, c0: Value, xs: list[Value]) -> None:
        """Eight f32 values to the lane's row, columns c0 .., of the subgroup's tile `slot`."""
        self.own.store(self._own0(slot) + self.r * self.wide + c0 / _VEC,
                       _pack8(self.kb, self.elem, xs))

    def write_out(self, accs: list[coopmat.Fragment], out: object, heads: int, head: Value,
                  mul: float, rb: int = 0) -> None:
        """Accumulators (the subgroup's row block rb: 16 rows x hd) * mul to an output, rows
        inside T (the caller barriers before the scratch is written again)."""
        kb, hd, lanes = self.kb, self.hd, self.cfg.lanes
        ld = hd + 4
        for n, x in enumerate(accs):
            self.store_scratch(x, 0, ld, n * _F)
        coopmat.subgroup_barrier(kb)
        per = hd // 4
        with kb.loop(self.lane, _F * per, lanes) as e:
            rr, d4 = e / per, e % per
            row = self.block_row0(rb) + rr
            vec = self.scr.load(self._scr(0, rr * (ld // 4)) + d4)
            with kb.if_(row < self.p["t"]):
                ob = A._out_base(self.c, heads, head, row) + d4 * 4
                for i in range(4):
                    v = kb.extract(vec, i)
                    out.store(ob + i, v * mul if mul != 1.0 else v)  # type: ignore[attr-defined]

    def binary(self, spec: KernelSpec, caps: object, heads: int, flops: int, what: str
               ) -> KernelBinary:
        cfg = self.cfg
        blocks = f" ({cfg.row_blocks} per subgroup)" if cfg.row_blocks > 1 else ""
        notes: dict = {"flops": flops, "variant":
                       f"coopmat flash {what} rows {cfg.rows}{blocks} tile {cfg.block}"}
        if cap(caps, "subgroup_size_control", False):  # else the device's size is fixed
            notes["required_subgroup_size"] = cfg.lanes
        return self.kb.binary(spec, A._grid(self.c, heads, caps), notes=notes)


def _nan_max(kb: KernelBuilder, xs: list[Value]) -> Value:
    return reduce(lambda a, b: nan_minmax(kb, "max", a, b), xs)


def _sum(xs: list[Value]) -> Value:
    return reduce(lambda a, b: a + b, xs)


def generate_fwd(spec: KernelSpec, caps: object, cfg: CmConfig) -> KernelBinary:
    """O = softmax(q k^T * scale) v and the row log-sum-exp, online over key tiles."""
    p = dict(spec.params)
    outs_decl = [(n, p["out_dtype"] if n == "o" else "f32") for n in p["outputs"]]
    K = _Kernel(spec, caps, cfg, "attention_fwd", ("q", "k", "v"), outs_decl)
    kb, c, t, hd, h, bl, scale = K.kb, K.c, p["t"], p["hd"], p["h"], cfg.block, p["scale"]
    q, k, v = K.ins["q"], K.ins["k"], K.ins["v"]
    hk = c.head / (h // p["hkv"]) if h != p["hkv"] else c.head
    i = K.row0 + K.r  # the lane's query row
    qf = K.own_fragments("q", q.base(c.bi, c.head))
    kbase, vbase = k.base(c.bi, hk), v.base(c.bi, hk)
    lpr = cfg.lpr
    stats = kb.shared("f32", cfg.subgroups * 2 * _F * lpr)  # per row: lanes' max, then sum
    st0 = K.sg * (2 * _F * lpr) + K.r * lpr
    o_cols = K.groups(hd)
    o = [kb.var("f32", 0.0) for _ in range(_VEC * len(o_cols))]
    l_var, m_var, shift_var = kb.var("f32", 0.0), kb.var("f32", _NEG_INF), kb.var("f32", 0.0)

    own_end, kv, walk_end = K.kv_walk(kbase, vbase)

    def body(j0: Value, masked: bool) -> None:
        K.kv_next(kv, j0, walk_end)
        for n in range(bl // _F):
            K.store_scratch(K.product(qf, 0, n * _F, True), 0, bl + 4, n * _F)
        coopmat.subgroup_barrier(kb)
        cols = K.groups(bl)
        s = []
        for c0 in cols:
            for e, x in enumerate(K.read8(0, bl + 4, c0)):
                x = x * scale
                s.append(kb.select(A._allowed(c, j0 + c0 + e, i), x, _NEG_INF) if masked
                         else x)
        stats.store(st0 + K.slot, _nan_max(kb, s))
        coopmat.subgroup_barrier(kb)
        m_new = nan_minmax(kb, "max", m_var.get(),
                           _nan_max(kb, [stats.load(st0 + x) for x in range(lpr)]))
        # as the SIMT kernel: an infinite max shifts by 0; nothing seen yet rescales by 0
        shift = kb.select(A._is_inf(kb, m_new), kb.f32(0.0), m_new)
        corr = kb.select(kb.bitcast(m_var.get(), "u32") == 0xFF800000, kb.f32(0.0),
                         kb.exp(shift_var.get() - shift))
        ps = [kb.exp(x - shift) for x in s]
        stats.store(st0 + _F * lpr + K.slot, _sum(ps))
        for g, c0 in enumerate(cols):
            chunk = ps[g * _VEC:(g + 1) * _VEC]
            keeps = [c.keep(c.head, i, j0 + c0 + e) for e in range(_VEC)]
            K.write16(0, c0, [x if kp is None else x * kp
                              for x, kp in zip(chunk, keeps, strict=True)])
        coopmat.subgroup_barrier(kb)
        l_var.set(reduce(lambda a, b: a + b, [stats.load(st0 + _F * lpr + x)
                                              for x in range(lpr)], l_var.get() * corr))
        pa = [K.own_a(0, kk * _F) for kk in range(bl // _F)]
        for n in range(hd // _F):
            K.store_scratch(K.product(pa, 1, n * _F, False), 0, hd + 4, n * _F)
        coopmat.subgroup_barrier(kb)
        for g, c0 in enumerate(o_cols):
            for e, x in enumerate(K.read8(0, hd + 4, c0)):
                acc = o[g * _VEC + e]
                acc.set(kb.fma(acc.get(), corr, x))
        m_var.set(m_new)
        shift_var.set(shift)

    m_lo, m_hi, f_lo, f_hi = A._masked_ranges(c, own_end)
    A._loop_tiles(c, f_lo, f_hi, lambda j0: body(j0, False), t)
    A._loop_tiles(c, m_lo, m_hi, lambda j0: body(j0, True), cfg.rows)  # diagonal or tail
    lv = l_var.get()
    with kb.if_(i < t):
        if "o" in K.outs:
            ob = A._out_base(c, h, c.head, i)
            for g, c0 in enumerate(o_cols):
                for e in range(_VEC):
                    K.outs["o"].store(ob + c0 + e, ieee_div(kb, o[g * _VEC + e].get(), lv))
        if "lse" in K.outs:
            with kb.if_(K.slot == 0):
                K.outs["lse"].store((c.bi * h + c.head) * t + i,
                                    ScalarEmitter(kb).unary("log", lv) + shift_var.get())
    flops = 4 * p["b"] * h * t * t * hd // (2 if p["causal"] else 1)
    return K.binary(spec, caps, h, flops, "fwd")


def generate_dq(spec: KernelSpec, caps: object, cfg: CmConfig) -> KernelBinary:
    """dq = scale * dS k over key tiles, dS = P (dP - D), P = exp(S - lse)."""
    p = dict(spec.params)
    K = _Kernel(spec, caps, cfg, "attention_dq", A._BWD_INPUTS, [("dq", "f32")])
    kb, c, t, hd, h, bl = K.kb, K.c, p["t"], p["hd"], p["h"], cfg.block
    k, v = K.ins["k"], K.ins["v"]
    hk = c.head / (h // p["hkv"]) if h != p["hkv"] else c.head
    i = K.row0 + K.r
    qf = K.own_fragments("q", K.ins["q"].base(c.bi, c.head))
    dof = K.own_fragments("do", K.ins["do"].base(c.bi, c.head))
    lse = K.ins["lse"].at(K.ins["lse"].base(c.bi, c.head), kb.fmin(i, t - 1))
    dd = K.row_d(kb.fmin(i, t - 1))
    kbase, vbase = k.base(c.bi, hk), v.base(c.bi, hk)
    acc = [K.fc.var() for _ in range(hd // _F)]
    dp0 = _F * (bl + 4)  # scratch region of dP

    own_end, kv, walk_end = K.kv_walk(kbase, vbase)

    def body(j0: Value, masked: bool) -> None:
        K.kv_next(kv, j0, walk_end)
        for n in range(bl // _F):
            K.store_scratch(K.product(qf, 0, n * _F, True), 0, bl + 4, n * _F)
            K.store_scratch(K.product(dof, 1, n * _F, True), dp0, bl + 4, n * _F)
        coopmat.subgroup_barrier(kb)
        for c0 in K.groups(bl):
            ds = []
            for e, (x, dp) in enumerate(zip(K.read8(0, bl + 4, c0), K.read8(dp0, bl + 4, c0),
                                            strict=True)):
                ds.append(K.dq_element(i, j0 + c0 + e, x, dp, lse, dd, masked))
            K.write16(0, c0, ds)
        coopmat.subgroup_barrier(kb)
        da = [K.own_a(0, kk * _F) for kk in range(bl // _F)]
        K.add_dq(da, acc)

    return K.finish_dq(spec, caps, body, own_end, acc, "dq")


def generate_dkdv(spec: KernelSpec, caps: object, cfg: CmConfig) -> KernelBinary:
    """dv = P^T dO and dk = scale * dS^T q over every query head of the kv head and query
    tile, for the subgroup's 16 keys."""
    p = dict(spec.params)
    K = _Kernel(spec, caps, cfg, "attention_dkdv", A._BWD_INPUTS,
                [(n, "f32") for n in p["outputs"]])
    kb, c, hd, bl = K.kb, K.c, p["hd"], cfg.block
    j = K.row0 + K.r  # the lane's key row
    kf = K.own_fragments("k", K.ins["k"].base(c.bi, c.head))
    vf = K.own_fragments("v", K.ins["v"].base(c.bi, c.head))
    lse_sh, dd_sh = kb.shared("f32", bl), kb.shared("f32", bl)
    part_sh = kb.shared("f32", bl * (hd // _VEC))
    dk = [K.fc.var() for _ in range(hd // _F)]
    dv = [K.fc.var() for _ in range(hd // _F)]
    dp0 = _F * (bl + 4)

    def body(hh: Value, i0: Value, masked: bool) -> None:
        K.stage_queries(hh, i0, lse_sh, dd_sh, part_sh)
        for n in range(bl // _F):  # S^T = k q^T, dP^T = v dO^T for the subgroup's keys
            K.store_scratch(K.product(kf, 0, n * _F, True), 0, bl + 4, n * _F)
            K.store_scratch(K.product(vf, 1, n * _F, True), dp0, bl + 4, n * _F)
        coopmat.subgroup_barrier(kb)
        for c0 in K.groups(bl):
            pd, ds = [], []
            for e, (x, dp) in enumerate(zip(K.read8(0, bl + 4, c0), K.read8(dp0, bl + 4, c0),
                                            strict=True)):
                col = c0 + e
                ii = i0 + col
                pr, d = K.dkdv_element(hh, ii, j, col, x, dp, lse_sh, dd_sh, masked)
                pd.append(pr)
                ds.append(d)
            K.write16(0, c0, pd)
            K.write16(1, c0, ds)
        coopmat.subgroup_barrier(kb)
        pa = [K.own_a(0, kk * _F) for kk in range(bl // _F)]
        sa = [K.own_a(1, kk * _F) for kk in range(bl // _F)]
        K.add_dkdv(pa, sa, dk, dv)

    A._query_tiles(c, body)
    return K.finish_dkdv(spec, caps, dk, dv, "dkdv")


_GENERATORS = {"attention_fwd": generate_fwd, "attention_dq": generate_dq,
               "attention_dkdv": generate_dkdv}


def generate(spec: KernelSpec, caps: object) -> KernelBinary | None:
    """The tensor-core kernel for an attention spec, or None where the variant does not
    apply (the SIMT kernel runs)."""
    from . import attention_registers  # it builds on this file's _Kernel

    fast = attention_registers.generate(spec, caps)
    if fast is not None:
        return fast
    cfg = choose(spec.family, dict(spec.params), caps)
    return None if cfg is None else _GENERATORS[spec.family](spec, caps, cfg)


A.FAST_VARIANTS.append(generate)
