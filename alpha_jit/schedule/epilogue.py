"""GEMM epilogues: the elementwise group that consumes a matmul's result runs in the GEMM's store.

Why: after a GEMM a transformer adds a bias, applies GELU, adds the residual, or (backward)
multiplies by the GELU derivative and sums the q/k/v input gradients. Each was a kernel of its
own that read the f32 GEMM result back from memory: one dispatch and two passes over an
activation-sized tensor per GEMM. Here the whole fused group becomes the matmul kernel's
epilogue (the matmul family's ("epilogue", ...) param): the GEMM result never reaches memory.

When a group qualifies: every use of the matmul's result (directly or through reshapes, which
keep the element order) is inside that one group; the group is not larger than the result
(no broadcast of it); each of its other inputs can be read at the GEMM's (batch, row, column)
through strides; and the kernel stays within the device's bindings. Groups fed by several
GEMMs take the last one's epilogue (the others are ordinary inputs). Anything else stays a
separate kernel, and `ALPHA_JIT_DISABLE_PASSES=gemm_epilogue` turns the pass off.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alpha_jit.codegen_spirv.kernels.matmul import needs_acc_buffer

if TYPE_CHECKING:
    from alpha_jit.codegen_spirv.lower import _Lowerer

log = logging.getLogger("alpha_jit.schedule")
PASS_NAME = "gemm_epilogue"


@dataclass(frozen=True)
class Epilogue:
    """Group `group` runs in the store of matmul `matmul`; `chain` is the matmul and the
    reshapes between it and the group, all read as the accumulator."""

    matmul: int
    group: int
    chain: frozenset[int]


def enabled() -> bool:
    off = {s.strip() for s in os.environ.get("ALPHA_JIT_DISABLE_PASSES", "").split(",")}
    return PASS_NAME not in off


def find(lw: _Lowerer, order: list[int]) -> dict[int, Epilogue]:
    """group id -> its epilogue, for the groups that can run in a GEMM's store (structure only:
    views of the other inputs are checked when the kernel is emitted)."""
    g = lw.g
    roots = set(g.roots())
    written = set(g.state_writes.values())
    found: dict[int, Epilogue] = {}
    for n in order:
        if lw._cls(n) != "matmul" or n in roots or n in written:
            continue
        chain, readers = {n}, []
        stack, ok = [n], True
        while stack and ok:
            u = stack.pop()
            for v in g.users(u):
                if g.op(v) == "reshape" and v not in roots and v not in written:
                    chain.add(v)
                    stack.append(v)
                elif lw._cls(v) == "elementwise" and v in lw.group and g.op(v) != "pad":
                    readers.append((v, u))
                else:
                    ok = False
        groups = {lw.group[v] for v, _ in readers}
        if not ok or len(groups) != 1:
            continue
        gid = groups.pop()
        shape = g.shape(lw.members[gid][0])
        if math.prod(shape) != math.prod(g.shape(n)) or any(g.shape(u) != shape
                                                            for _, u in readers):
            continue  # the group broadcasts the result: it is not one element per sum
        if any(lw._cls(m) == "elementwise" and g.op(m) == "pad" for m in lw.members[gid]):
            continue
        found[gid] = Epilogue(n, gid, frozenset(chain))  # a later GEMM feeding it wins
    return found


def regroup(shape: tuple, strides: tuple, new_shape: tuple) -> tuple | None:
    """Strides that read the same elements as (shape, strides) in the row-major order of
    `new_shape` (same element count), or None where no strided form exists."""
    old = [(s, st) for s, st in zip(shape, strides, strict=True) if s != 1]
    out = []
    i = 0
    for t in new_shape:
        if t == 1:
            out.append(0)
            continue
        need, parts = t, []
        while need > 1:
            if i >= len(old):
                return None
            s, st = old[i]
            if need % s == 0:  # the whole old axis goes into this one
                parts.append((s, st))
                need //= s
                i += 1
            elif s % need == 0:  # split the old axis: its outer part goes into this one
                parts.append((need, st * (s // need)))
                old[i] = (s // need, st)
                need = 1
            else:
                return None
        for (_, st0), (s1, st1) in zip(parts, parts[1:], strict=False):
            if st0 != st1 * s1:
                return None
        out.append(parts[-1][1])
    return tuple(out)


def emit(lw: _Lowerer, ep: Epilogue) -> bool:
    """Emit matmul `ep.matmul` with group `ep.group` in its store and return True; or, when an
    input has no strided form at the GEMM's (batch, row, column) or the bindings do not fit,
    emit the plain matmul and return False (the caller then emits the group)."""
    params, reads = lw.matmul_params(ep.matmul)
    region = lw.region(ep.group, ep.chain)
    p = dict(params)
    grid = (p["batch"], p["m"], p["n"])
    inputs = []
    for dt, strides, off, *_ in region.inputs:
        inputs.append((dt, regroup(region.shape, strides, grid), off))
    acc = needs_acc_buffer(params, lw.caps)
    why = None
    if any(st is None for _, st, _ in inputs):
        why = "an input of the group has no strided form at the GEMM's element"
    elif 2 + len(inputs) + len(region.outs) + acc > lw.max_bindings:
        why = "the bindings would exceed the device's limit"
    if why is not None:
        log.info("%s: %%%d (%s) keeps its own kernel: %s", PASS_NAME, ep.matmul,
                 lw.g.prov(ep.matmul).where(), why)
        lw.add_temp(ep.matmul)
        lw._emit("matmul", f"matmul_{p['batch']}x{p['m']}x{p['n']}x{p['k']}", params, reads,
                 [ep.matmul], [ep.matmul], ep.matmul)
        return False
    params = tuple((k, "f32" if k == "out_dtype" else v) for k, v in params) + (
        ("epilogue", (tuple(inputs), region.exprs, region.outputs)),)
    writes = list(region.outs)
    if acc:  # the f32 sums live in the matmul node's own buffer
        params += (("acc_buffer", True),)
        lw.add_temp(ep.matmul)
        writes.insert(0, ep.matmul)
    name = f"matmul_{p['batch']}x{p['m']}x{p['n']}x{p['k']}_{region.name}"[:60]
    nodes = [ep.matmul, *sorted(ep.chain - {ep.matmul}), *region.members]
    lw._emit("matmul", name, params, reads + list(region.reads), writes, nodes,
             region.members[-1], fused_by=(PASS_NAME,))
    return True
