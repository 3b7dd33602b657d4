"""Epilogues: the elementwise group that consumes a GEMM's (or a norm gradient's) result runs in
that kernel's store.

Why: after a GEMM a transformer adds a bias, applies GELU, adds the residual, or (backward)
multiplies by the GELU derivative and sums the q/k/v input gradients. Each was a kernel of its
own that read the f32 GEMM result back from memory: one dispatch and two passes over an
activation-sized tensor per GEMM. Here the whole fused group becomes the matmul kernel's
epilogue (the matmul family's ("epilogue", ...) param): the GEMM result never reaches memory.

When a group qualifies: every use of the matmul's result (directly or through reshapes, which
keep the element order) is inside that one group; the group is not larger than the result
(no broadcast of it); each of its other inputs can be read at the GEMM's (batch, row, column)
through strides; it writes no state (an optimizer update stays an elementwise kernel,
which updates the state in place); and the kernel stays within the device's bindings. Groups
fed by several GEMMs take the last one's epilogue (the others are ordinary inputs). Anything
else stays a separate kernel, and `ALPHA_JIT_DISABLE_PASSES=gemm_epilogue` turns the pass off.

The same holds for any kernel registered as a host (`register_host`): the LayerNorm/RMSNorm
input gradient takes the residual gradient's add (and the bf16 copy for the next GEMM).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alpha_jit.codegen_spirv.kernels.matmul import needs_acc_buffer
from alpha_jit.codegen_spirv.views import regroup

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
    from alpha_jit.ir.passes.manager import disabled_passes

    return PASS_NAME not in disabled_passes()


def find(lw: _Lowerer, order: list[int]) -> dict[int, Epilogue]:
    """group id -> its epilogue, for the groups that can run in a GEMM's store (structure only:
    views of the other inputs are checked when the kernel is emitted)."""
    g = lw.g
    roots = set(g.roots())
    written = set(g.state_writes.values())
    found: dict[int, Epilogue] = {}
    for n in order:
        if g.op(n) not in _HOST_OPS or n in roots or n in written:
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
        if any(m in written for m in lw.members[gid]):
            # an update of state (an optimizer step reading a weight gradient the GEMM writes
            # in the weight's layout) stays an elementwise kernel: it updates in place there,
            # with no copy at the end of the step
            continue
        found[gid] = Epilogue(n, gid, frozenset(chain))  # a later GEMM feeding it wins
    return found


@dataclass(frozen=True)
class Host:
    """A kernel that can run an epilogue: its family, name, params and reads without one,
    its iteration space, and whether its plain output stays bound (an f32 accumulator)."""

    family: str
    name: str
    params: tuple
    reads: tuple
    grid: tuple
    acc_buffer: bool = False


HostFn = Callable[["_Lowerer", int], Host]
_HOSTS: dict[str, HostFn] = {}
_HOST_OPS = ("matmul", "norm_dx")  # ops whose kernels take an epilogue


def register_host(op: str) -> Callable[[HostFn], HostFn]:
    """Decorator: `fn(lowerer, node) -> Host` for an op whose kernel takes an epilogue
    (defined beside the op's kernel lowering)."""
    def deco(fn: HostFn) -> HostFn:
        _HOSTS[op] = fn
        return fn

    return deco


def _host(lw: _Lowerer, n: int) -> Host:
    op = lw.g.op(n)
    if op not in _HOSTS:
        from alpha_jit.codegen_spirv.kernels import import_all

        import_all()
    return _HOSTS[op](lw, n)


@register_host("matmul")
def _matmul_host(lw: _Lowerer, n: int) -> Host:
    params, reads = lw.matmul_params(n)
    p = dict(params)
    params = tuple((k, "f32" if k == "out_dtype" else v) for k, v in params)
    return Host("matmul", f"matmul_{p['batch']}x{p['m']}x{p['n']}x{p['k']}", params,
                tuple(reads), (p["batch"], p["m"], p["n"]), needs_acc_buffer(params, lw.caps))


def emit(lw: _Lowerer, ep: Epilogue) -> bool:
    """Emit the host kernel of `ep.matmul` with group `ep.group` in its store and return True;
    or, when an input has no strided form at the host's element or the bindings do not fit,
    emit the plain host kernel and return False (the caller then emits the group)."""
    n = ep.matmul
    host = _host(lw, n)
    region = lw.region(ep.group, ep.chain)
    inputs = [(dt, regroup(region.shape, strides, host.grid), off)
              for dt, strides, off, *_ in region.inputs]
    why = None
    iotas = {a[1] for _op, _dt, _at, args in region.exprs for a in args
             if a[0] == "iota" and a[1] >= 0}
    if any(st is None for _, st, _ in inputs):
        why = "an input of the group has no strided form at the kernel's element"
    elif iotas and tuple(region.shape) != tuple(host.grid):
        why = "the group indexes its own axes (iota), which are not the kernel's"
    elif len(host.reads) + len(inputs) + len(region.outs) + host.acc_buffer > lw.max_bindings:
        why = "the bindings would exceed the device's limit"
    if why is not None:
        log.info("%s: %%%d (%s) keeps its own kernel: %s", PASS_NAME, n, lw.g.prov(n).where(),
                 why)
        lw.add_temp(n)
        plain = tuple(kv for kv in host.params if kv[0] != "out_dtype") + (
            ("out_dtype", lw.g.dtype(n).name),)
        lw._emit(host.family, host.name, plain, list(host.reads), [n], [n], n)
        return False
    # the group reads the host's value as the graph stores it: rounded if 16-bit
    params = host.params + (("epilogue", (tuple(inputs), region.exprs, region.outputs)),
                            ("acc_dtype", lw.g.dtype(n).name))
    writes = list(region.outs)
    if host.acc_buffer:  # the f32 sums live in the host node's own buffer
        params += (("acc_buffer", True),)
        lw.add_temp(n)
        writes.insert(0, n)
    nodes = [n, *sorted(ep.chain - {n}), *region.members]
    lw._emit(host.family, f"{host.name}_{region.name}"[:60], params,
             list(host.reads) + list(region.reads), writes, nodes, region.members[-1],
             fused_by=(PASS_NAME,))
    return True
