"""The gather kernel family (embedding lookups) and the helpers its scatter twin shares.

Why: `table[ids]` (embeddings, label picks) and its VJP, `zeros(V, D).index_add(ids, src)`
(`scatter.py`), are the only data-dependent addressing in a training step. Both are written for
safety and reproducibility first:
- gather never reads outside the table: an id outside [0, V) writes NaN (INT_MIN for integer
  tables) instead of a clamped row, so a bad id is loud, never a silently wrong value (ids are
  also range-checked on the host before any GPU work);
- scatter is deterministic without float atomics: each output row sums its source rows in the
  order of their positions, in f32, so every run gives the same bits (`scatter.py`).

A workgroup is (lx, ly): lx threads along the embedding dimension d, ly rows; small D packs
several rows per workgroup instead of idling threads.

Spec (params as (key, value) pairs):
    gather:  ("rows", V), ("dim", D), ("n", N), ("dtype", dt), ("table_offset", t),
             ("ids_offset", i)
             bindings: table (element (r, d) at t + r*D + d), ids i32 (N from i), out (N, D)
    scatter: see `scatter.py`.
Push constants (base_x, base_y, base_z) offset the workgroup ids of split grids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..dsl import KernelBuilder, Value, cap, pack_push_constants
from ..kernel import Dispatch, KernelBinary, KernelSpec
from .elementwise import storage_dtype
from .matmul import grid_plan

DEFAULT_LOCAL_SIZE = 256
_INT_MIN = -(1 << 31)


def budget(caps: object) -> int:
    """Invocations per workgroup: DEFAULT_LOCAL_SIZE or the device's limit, a power of two."""
    n = int(min(DEFAULT_LOCAL_SIZE, cap(caps, "max_workgroup_invocations",  # type: ignore
                                        DEFAULT_LOCAL_SIZE)))
    return 1 << (n.bit_length() - 1)


def local_shape(dim: int, caps: object, min_lx: int = 1) -> tuple[int, int]:
    """(lx, ly): lx a power of two covering D (at least min_lx) up to the budget, ly rows
    filling the rest."""
    total = budget(caps)
    lx = min(total, max(min_lx, 1 << max(0, dim - 1).bit_length()))
    return lx, total // lx


def setup(spec: KernelSpec, caps: object, first: str, out_rows: int, shape: tuple[int, int],
          cols: int = 1, rows: int = 1, fields: Sequence[tuple[str, str]] = ()
          ) -> tuple[KernelBuilder, dict, tuple, dict[str, Value], Value, Value]:
    """Builder, params, bindings (first, ids, out), push constants (base_x, base_y, base_z,
    then `fields`), this invocation's first row and first column: a workgroup of `shape`
    (lx, ly) owns ly * `rows` rows (an invocation's others follow at strides of ly) and
    lx * `cols` columns (its others at strides of lx). p["_groups"] is the grid."""
    p = dict(spec.params)
    lx, ly = shape
    kb = KernelBuilder(spec.name, (lx, ly, 1), caps)
    dt = storage_dtype(p["dtype"])
    bufs = (kb.buffer(first, dt, writable=False), kb.buffer("ids", "i32", writable=False),
            kb.buffer("out", dt, writable=True))
    pc = kb.push_constants([("base_x", "u32"), ("base_y", "u32"), ("base_z", "u32"), *fields])
    d = (kb.workgroup_id(0) + pc["base_x"]) * (lx * cols) + kb.local_id(0)
    row = (kb.workgroup_id(1) + pc["base_y"]) * (ly * rows) + kb.local_id(1)
    p["_groups"] = (math.ceil(p["dim"] / (lx * cols)), math.ceil(out_rows / (ly * rows)), 1)
    return kb, p, bufs, pc, row, d


def dispatches(groups: Sequence[int], caps: object, *extra: int) -> list[Dispatch]:
    """The dispatches of a grid, split within the device's limits; push constants: the split's
    base workgroup ids, then `extra` (u32 each)."""
    return [Dispatch(cnt, pack_push_constants([("u32", b) for b in (*base, *extra)]))
            for cnt, base in grid_plan(groups, caps)]


def finish(kb: KernelBuilder, spec: KernelSpec, p: dict, caps: object,
           plan: Sequence[Dispatch] | None = None, variant: str | None = None) -> KernelBinary:
    """Package the module: one pass over p["_groups"] unless `plan` lists the dispatches."""
    notes = {"rows": p["rows"], "dim": p["dim"], "n": p["n"]}
    if variant is not None:
        notes["variant"] = variant
    plan = dispatches(p["_groups"], caps) if plan is None else plan
    return kb.binary(spec, plan, notes=notes)


def generate_gather(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """out[i, d] = table[ids[i], d]; NaN (INT_MIN for i32) where ids[i] is outside [0, V)."""
    V, D, N = (dict(spec.params)[k] for k in ("rows", "dim", "n"))
    kb, p, (table, ids, out), _, i, d = setup(spec, caps, "table", N, local_shape(D, caps))
    t_off, i_off = p["table_offset"], p["ids_offset"]
    bad = kb.f32(float("nan")) if table.compute == "f32" else kb.const(_INT_MIN, table.compute)
    with kb.if_((i < N) & (d < D)):
        r = ids.load(i + i_off)  # one id per row of threads: a broadcast load
        dst = i * D + d
        with kb.if_else((r >= 0) & (r < V)) as (ok, oob):
            with ok:
                out.store(dst, table.load(kb.cast(r, "u32") * D + (d + t_off)))
            with oob:
                out.store(dst, bad)
    return finish(kb, spec, p, caps)


def generate_scatter(spec: KernelSpec, caps: object = None) -> KernelBinary:
    """The scatter family's entry point (`generate.py` maps it here); `scatter.py` holds it."""
    from . import scatter  # scatter builds on this module's helpers: imported on first use

    return scatter.generate(spec, caps)
