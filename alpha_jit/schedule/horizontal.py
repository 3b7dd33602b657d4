"""Horizontal fusion: independent elementwise kernels with the same expression become one
multi-tensor kernel.

A training step repeats the same small kernel once per parameter: the optimizer update, the
cast of each weight to bf16, the square of each gradient for the norm. Each is its own
dispatch (on the `small` GPT: 100 AdamW kernels, 123 casts) although they differ only in
shapes and buffers. This pass groups elementwise kernels whose expression, input dtypes and
output dtypes are equal (shapes, strides and buffers may differ) into one `elementwise_multi`
kernel with a segment per member.

Order stays correct by construction: a group is placed where its last member was, and a
group closes as soon as any later kernel reads something a member wrote, so no member moves
past a consumer of its outputs (members only ever move later, after their inputs exist).
A group also closes when one more member would exceed the device's bindings per stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.lower import Lowered, LoweredKernel

log = logging.getLogger("alpha_jit.schedule")
PASS_NAME = "horizontal"  # ALPHA_JIT_DISABLE_PASSES=horizontal switches it off
MAX_SEGMENTS = 64  # a segment is an unrolled branch in the module: bound the module size


@dataclass
class _Group:
    members: list[int] = field(default_factory=list)  # kernel positions
    reads: dict[int, None] = field(default_factory=dict)  # distinct buffers read, in order
    writes: set[int] = field(default_factory=set)


def _signature(k: LoweredKernel) -> tuple | None:
    """What members must share: the expression and the dtypes (and windowing) of every input
    and output. None for kernels this pass does not group."""
    if k.spec.family != "elementwise":
        return None
    p = dict(k.spec.params)
    ins = tuple((e[0], len(e) > 3) for e in p["inputs"])
    return (p["exprs"], ins, p["outputs"])


def enabled() -> bool:
    from alpha_jit.ir.passes.manager import disabled_passes

    return PASS_NAME not in disabled_passes()


def hoist_leaf_kernels(low: Lowered) -> None:
    """Move kernels that read only the step's leaves (parameters, inputs, hparams) to the front,
    in their order: the cast of every weight to bf16 then sits in one place, where it fuses
    into one kernel, instead of right before each use."""
    temps = {b.id for b in low.buffers.values() if b.kind == "temp"}
    front = [k for k in low.kernels if not temps & set(k.reads)]
    rest = [k for k in low.kernels if temps & set(k.reads)]
    low.kernels = front + rest


def fuse_horizontally(low: Lowered, max_bindings: int) -> Lowered:
    """`low` with groups of independent same-expression elementwise kernels merged (in place;
    returned for chaining). `max_bindings`: storage buffers one kernel may bind."""
    hoist_leaf_kernels(low)
    kernels = low.kernels
    open_groups: dict[tuple, _Group] = {}
    done: list[_Group] = []
    for i, k in enumerate(kernels):
        reads = set(k.reads)
        for sig in [s for s, grp in open_groups.items() if grp.writes & reads]:
            done.append(open_groups.pop(sig))  # k consumes a member: nothing joins after it
        sig = _signature(k)
        if sig is None:
            continue
        grp = open_groups.get(sig)
        if grp is not None:
            bindings = len(grp.reads.keys() | set(k.reads)) + len(grp.writes) + len(k.writes)
            if bindings > max_bindings or len(grp.members) >= MAX_SEGMENTS:
                done.append(open_groups.pop(sig))
                grp = None
        if grp is None:
            grp = open_groups[sig] = _Group()
        grp.members.append(i)
        grp.reads.update(dict.fromkeys(k.reads))
        grp.writes.update(k.writes)
    done.extend(open_groups.values())
    merged = {g.members[-1]: g for g in done if len(g.members) > 1}
    absorbed = {m for g in merged.values() for m in g.members[:-1]}
    out: list[LoweredKernel] = []
    for i, k in enumerate(kernels):
        if i in merged:
            out.append(_merge([kernels[m] for m in merged[i].members]))
        elif i not in absorbed:
            out.append(k)
    if merged:
        log.info("%s: %d kernels merged into %d multi-tensor kernels", PASS_NAME,
                 len(absorbed) + len(merged), len(merged))
    low.kernels = out
    return low


def _merge(members: list[LoweredKernel]) -> LoweredKernel:
    """One elementwise_multi kernel computing every member (reads deduplicated, writes kept)."""
    reads = list(dict.fromkeys(b for k in members for b in k.reads))
    writes = [b for k in members for b in k.writes]
    binding = {b: i for i, b in enumerate(reads)}
    first = dict(members[0].spec.params)
    dtype_of: dict[int, str] = {}
    segments = []
    for j, k in enumerate(members):
        p = dict(k.spec.params)
        ins = tuple((binding[b], *entry) for b, entry in zip(k.reads, p["inputs"], strict=True))
        for b, entry in zip(k.reads, p["inputs"], strict=True):
            dtype_of[b] = entry[0]
        base = len(reads) + sum(len(m.writes) for m in members[:j])
        outs = tuple(base + o for o in range(len(k.writes)))
        segments.append((tuple(p["shape"]), ins, outs))
    out_dtypes = [dt for k in members for dt, _ in dict(k.spec.params)["outputs"]]
    bindings = tuple((dtype_of[b], False) for b in reads) + tuple((dt, True) for dt in out_dtypes)
    params = (("bindings", bindings), ("exprs", first["exprs"]), ("outputs", first["outputs"]),
              ("segments", tuple(segments)))
    name = f"multi{len(members)}_{members[0].spec.name}"[:48]
    # a member's in-place pair holds if no other segment reads that buffer
    count: dict[int, int] = {}
    for k in members:
        for b in set(k.reads):
            count[b] = count.get(b, 0) + 1
    pairs = tuple(pr for k in members for pr in k.inplace if count[pr[0]] == 1)
    if pairs:
        params += (("aliased", True),)
    return LoweredKernel(KernelSpec("elementwise_multi", name, params), reads, writes,
                         [n for k in members for n in k.nodes], members[-1].prov,
                         inplace=pairs)
