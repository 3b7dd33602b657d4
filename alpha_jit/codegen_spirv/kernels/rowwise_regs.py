"""Norm rows held in registers: LayerNorm / RMSNorm forward and input gradient where a row fits
a subgroup's lanes as 16-byte vectors.

Why: the general row kernels (rowwise.py) read a row once per pass (mean, variance, output;
two sums then the output for dx), one element per load, through shared memory where a
workgroup owns the row. On the H200 `gpt2`'s 25 LayerNorm forwards moved 2.0 TB/s and its 25
input gradients (with the residual gradient's add) 2.7 TB/s. Here one subgroup owns a row and
each lane holds its part of every operand in registers, so each byte is read once and the
sums are subgroup reductions alone (no barrier, no shared memory).

Layout: lane l of a `lanes`-wide subgroup holds groups of 8 adjacent elements starting at
elements (l + t * lanes) * 8 for t < dim / (8 * lanes) (at most `MAX_GROUPS`), each read as one
16-byte vector of bf16 or two of f32, and stores its outputs likewise (dx through the epilogue
store's `EpilogueStore.finish_run`, which reads a residual as vectors too). A lane's sums add
its values in order, then the subgroup reduces: deterministic, not the general kernels' order
(the last bits may differ from theirs). `fits` says where this applies: rows owned by pinned
subgroups (`rowwise.row_subgroup`), whole groups, bf16 or f32 operands and outputs at offsets
that are multiples of 8; elsewhere the general kernels run.
"""

from __future__ import annotations

from typing import Any

from ..dsl import KernelBuilder, Value
from ..kernel import KernelBinary, KernelSpec
from .elementwise import (
    VECTOR_VIEW,
    VECTOR_WIDTH,
    EpilogueStore,
    ScalarRule,
    load_run,
    storage_dtype,
    store_run,
)

GROUP = 8  # adjacent elements per lane and group: one 16-byte bf16 vector, two f32 ones
MAX_GROUPS = 4  # groups per lane: 32 values of each operand in registers


def fits(p: dict, caps: object, operands: tuple[str, ...], outputs: list[str]) -> bool:
    """Whether a norm spec's rows go in registers: `operands` (keys of (dtype, offset)
    entries) and `outputs` (dtypes) all bf16 or f32, offsets multiples of 8, and the row
    whole groups of a pinned subgroup's lanes, at most MAX_GROUPS per lane."""
    from .rowwise import row_subgroup

    dim = int(p["dim"])
    lanes = row_subgroup(dim, caps)
    if lanes is None or dim % (GROUP * lanes) or dim // (GROUP * lanes) > MAX_GROUPS:
        return False
    entries = [p[k] for k in operands if k in p]
    return all(dt in VECTOR_WIDTH and int(off) % GROUP == 0 for dt, off in entries) \
        and all(dt in VECTOR_WIDTH for dt in outputs)


class _Groups:
    """Loads and stores of a lane's groups of one binding (a 16-byte view)."""

    def __init__(self, kb: KernelBuilder, buf: Any, dtype: str, writable: bool = False):
        self.kb, self.dtype = kb, dtype
        self.view = kb.buffer_view(buf, VECTOR_VIEW[dtype], writable=writable)

    def load(self, at: Value) -> list[Value]:
        """The 8 elements from element `at` (a multiple of 8) as f32."""
        return load_run(self.kb, self.view, self.dtype, at, GROUP)

    def store(self, at: Value, values: list[Value]) -> None:
        """8 values to the elements from `at`, rounded as an element store rounds."""
        store_run(self.kb, self.view, self.dtype, at, values)


def _total(values: list[Value]) -> Value:
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _rows(spec: KernelSpec, caps: object) -> Any:
    """The row kernel (rowwise._Rows: a subgroup per row, `fits` checked)."""
    from .rowwise import _Rows

    return _Rows(spec, caps, int(dict(spec.params)["dim"]))


def _starts(r: Any) -> list[Value]:
    """This lane's group starts within a row (elements)."""
    groups = r.dim // (GROUP * r.lanes)
    return [(r.lid + t * r.lanes) * GROUP for t in range(groups)]


def norm_fwd(spec: KernelSpec, caps: object) -> KernelBinary:
    """out = (x - mean) * rstd * w (+ b) with the row in registers (rowwise.generate_norm_fwd
    where `fits`)."""
    r = _rows(spec, caps)
    kb, p, dim = r.kb, r.p, r.dim
    x, xo = r.operand("x")
    w, wo = r.operand("w")
    b = r.operand("b") if "b" in p else None
    out = kb.buffer("out", storage_dtype(p["out_dtype"]), writable=True)
    stats = kb.buffer("stats", "f32", writable=True) if p.get("stats_out") else None
    r.start()
    xg, wg = _Groups(kb, x, p["x"][0]), _Groups(kb, w, p["w"][0])
    bg = _Groups(kb, b[0], p["b"][0]) if b is not None else None
    og = _Groups(kb, out, p["out_dtype"], writable=True)
    starts = _starts(r)
    with r.rows_loop() as row:
        base = row * dim
        xs = [xg.load(base + s + xo) for s in starts]
        vals = [v for grp in xs for v in grp]
        if p["rms"]:
            mean = kb.f32(0.0)
            sq = r._reduce("add", _total([v * v for v in vals]))
        else:
            mean = r._reduce("add", _total(vals)) / float(dim)
            sq = r._reduce("add", _total([(v - mean) * (v - mean) for v in vals]))
        rstd = r.em.unary("rsqrt", sq / float(dim) + float(p["eps"]))
        if stats is not None:
            with kb.if_(r.lid == 0):
                stats.store(row * 2, mean)
                stats.store(row * 2 + 1, rstd)
        for s, grp in zip(starts, xs, strict=True):
            # w and b per row from cache: held across rows (unlike dx's w) they would double
            # the registers the row takes
            ws = wg.load(s + wo)
            ys = [(v - mean) * rstd * wj for v, wj in zip(grp, ws, strict=True)]
            if bg is not None:
                ys = [y + bj for y, bj in zip(ys, bg.load(s + b[1]), strict=True)]
            og.store(base + s, ys)
    return r.finish({"dim": dim}, "row in registers")


def norm_dx(spec: KernelSpec, caps: object, scalar_rule: ScalarRule | None) -> KernelBinary:
    """dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) with the row in registers, its
    epilogue (the residual gradient's add) on 8 elements at a time (rowwise.generate_norm_dx
    where `fits`)."""
    r = _rows(spec, caps)
    kb, p, dim = r.kb, r.p, r.dim
    x, xo = r.operand("x")
    w, wo = r.operand("w")
    g, go = r.operand("g")
    st, so = r.operand("stats", "f32")
    out = EpilogueStore(kb, p, scalar_rule, (int(p["rows"]), dim))
    r.start()
    xg, wg, gg = (_Groups(kb, buf, p[k][0]) for buf, k in ((x, "x"), (w, "w"), (g, "g")))
    starts = _starts(r)
    ws = [wg.load(s + wo) for s in starts]  # the same for every row
    with r.rows_loop() as row:
        base = row * dim
        mean, rstd = st.load(row * 2 + so), st.load(row * 2 + 1 + so)
        xhat = [[(v - mean) * rstd for v in xg.load(base + s + xo)] for s in starts]
        dxhat = [[gv * wv for gv, wv in zip(gg.load(base + s + go), wgrp, strict=True)]
                 for s, wgrp in zip(starts, ws, strict=True)]
        pairs = [(d, xh) for dgrp, xgrp in zip(dxhat, xhat, strict=True)
                 for d, xh in zip(dgrp, xgrp, strict=True)]
        c2 = r._reduce("add", _total([d * xh for d, xh in pairs])) / float(dim)
        c1 = kb.f32(0.0) if p["rms"] else r._reduce("add", _total([d for d, _ in pairs])) \
            / float(dim)
        for s, dgrp, xgrp in zip(starts, dxhat, xhat, strict=True):
            vs = []
            for d, xh in zip(dgrp, xgrp, strict=True):
                inner = d - xh * c2
                if not p["rms"]:
                    inner = inner - c1
                vs.append(rstd * inner)
            out.finish_run((row, s), base + s, vs)
    return r.finish({"dim": dim}, "row in registers")
