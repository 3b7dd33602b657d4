"""Sibling GEMM merge (QKV): Linears that read the same input become one GEMM on concatenated
weights, before autodiff, so the backward is merged too.

Why: attention's q, k and v projections (and any Linears sharing an input) are three GEMMs
forward, three input-gradient GEMMs and three weight-gradient GEMMs backward, each too narrow
to fill a large GPU on its own. Rewritten as one `x @ [Wq; Wk; Wv].T (+ [bq; bk; bv])` whose
result is sliced per projection, the forward is one GEMM (with its bias and output cast in the
store) and autodiff then produces one dX GEMM and one dW GEMM (whose column sums are the bias
gradients), with the three slices' gradients meeting in one padded sum.

The rewrite runs at `loss.backward()` on the forward graph: matmuls (2-D, forward phase) whose
left operands are the same value (equal up to identical casts and reshapes) and whose right
operands have one dtype and K form a group. Each member's single-use chain, matmul -> reshape
-> bias add -> cast, is merged as deep as all members share it, and the last merged node of
each member becomes a slice of the merged chain, in place: its node id, shape and dtype stay,
so tensors the user holds stay valid. The weights stay separate parameters (and separate in
checkpoints); `concat` of the weights (their casts moved after it) is one small kernel per
step. `ALPHA_JIT_DISABLE_PASSES=gemm_merge` (or `passes=` without it) turns it off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from alpha_jit.ir.graph import Graph, freeze_attrs

log = logging.getLogger("alpha_jit.passes")
PASS_NAME = "gemm_merge"
_SAME = ("cast", "reshape", "transpose")  # ops through which two operands count as one value


def _key(g: Graph, n: int, memo: dict[int, Any]) -> Any:
    """A structural key: equal for the same node, or for identical casts/views of equal keys."""
    if n not in memo:
        if g.op(n) in _SAME:
            memo[n] = (g.op(n), freeze_attrs(g.attrs(n)), g.dtype(n).name,
                       _key(g, g.args(n)[0], memo))
        else:
            memo[n] = n
    return memo[n]


def _chain(g: Graph, m: int, roots: set[int]) -> list[tuple[str, int]]:
    """(kind, node) from matmul m along its single-use chain: reshape (keeping the last axis),
    add of a [Co] bias, cast; in that order, each at most once."""
    co = g.shape(m)[-1]
    out = [("matmul", m)]
    kinds = ["reshape", "bias", "cast"]
    cur = m
    while kinds:
        users = g.users(cur)
        if cur in roots or len(users) != 1:
            break
        u = users[0]
        kind = None
        if g.op(u) == "reshape" and g.shape(u)[-1] == co:
            kind = "reshape"
        elif g.op(u) == "add" and g.args(u)[0] == cur and g.shape(g.args(u)[1]) == (co,) \
                and g.shape(u) == g.shape(cur):
            kind = "bias"
        elif g.op(u) == "cast":
            kind = "cast"
        if kind not in kinds:
            break
        kinds = kinds[kinds.index(kind) + 1:]
        out.append((kind, u))
        cur = u
    return out


def _compatible(g: Graph, chains: list[list[tuple[str, int]]], level: int) -> bool:
    kinds = {c[level][0] if len(c) > level else None for c in chains}
    if len(kinds) != 1 or None in kinds:
        return False
    kind = kinds.pop()
    nodes = [c[level][1] for c in chains]
    if kind == "reshape":
        return len({g.shape(n)[:-1] for n in nodes}) == 1
    if kind == "bias":
        return len({g.dtype(g.args(n)[1]) for n in nodes}) == 1 and \
            len({g.dtype(n) for n in nodes}) == 1
    if kind == "cast":
        return len({g.dtype(n) for n in nodes}) == 1
    return True


def _concat_operands(g: Graph, bs: list[int], axis: int) -> Any:
    """concat(bs, axis) with identical casts/transposes on top of all of them moved after the
    concat (so the cast of the concatenated weights is one fused kernel)."""
    from alpha_jit.tensor import Tensor, concat

    ops: list[tuple[str, dict]] = []
    while len({(g.op(b), freeze_attrs(g.attrs(b))) for b in bs}) == 1 \
            and g.op(bs[0]) in ("cast", "transpose"):
        op, attrs = g.op(bs[0]), dict(g.attrs(bs[0]))
        if op == "transpose":
            axis = tuple(attrs["perm"])[axis]
        ops.append((op, attrs))
        bs = [g.args(b)[0] for b in bs]
    t = concat([Tensor(b, g.shape(b), g.dtype(b)) for b in bs], axis=axis)
    for op, attrs in reversed(ops):
        t = t.permute(*attrs["perm"]) if op == "transpose" else t.astype(attrs["dtype"])
    return t


def _merge(ctx: Any, ms: list[int], roots: set[int]) -> None:
    from alpha_jit.ir import trace
    from alpha_jit.tensor import Tensor, concat

    g = ctx.graph
    chains = [_chain(g, m, roots) for m in ms]
    depth = 1
    while all(len(c) > depth for c in chains) and _compatible(g, chains, depth):
        depth += 1
    if _entangled(g, chains, depth):
        return
    widths = [g.shape(m)[-1] for m in ms]
    first = ms[0]
    a = g.args(first)[0]
    b_cat = _concat_operands(g, [g.args(m)[1] for m in ms], 1)
    t = Tensor(trace.apply("matmul", [Tensor(a, g.shape(a), g.dtype(a)), b_cat],
                           dict(g.attrs(first))).node, (g.shape(a)[0], sum(widths)),
               g.dtype(first))
    for level in range(1, depth):
        kind, n0 = chains[0][level]
        if kind == "reshape":
            t = t.reshape(*g.shape(n0)[:-1], sum(widths))
        elif kind == "bias":
            bias = [g.args(c[level][1])[1] for c in chains]
            t = t + concat([Tensor(b, g.shape(b), g.dtype(b)) for b in bias], axis=0)
        else:
            t = t.astype(g.dtype(n0))
    at = 0
    for c, w in zip(chains, widths, strict=True):
        last = c[depth - 1][1]
        shape = g.shape(last)
        starts = tuple([0] * (len(shape) - 1) + [at])
        stops = tuple([*shape[:-1], at + w])
        g.rewire(last, "slice", [t.node], {"starts": starts, "stops": stops})
        at += w


def _entangled(g: Graph, chains: list[list[tuple[str, int]]], depth: int) -> bool:
    """Whether a member's other operands (weight, bias) depend on another member's merged
    chain: the merged chain would then read its own result."""
    import networkx as nx

    nodes = [{n for _, n in c[:depth]} for c in chains]
    for i, c in enumerate(chains):
        extra = [g.args(c[0][1])[1]] + [g.args(n)[1] for kind, n in c[:depth] if kind == "bias"]
        anc = set().union(*(nx.ancestors(g.g, e) | {e} for e in extra))
        if any(anc & other for j, other in enumerate(nodes) if j != i):
            return True
    return False


def _independent(g: Graph, ms: list[int]) -> list[int]:
    """The members whose right operand depends on no other member (merging those would make
    the merged GEMM read its own result)."""
    import networkx as nx

    keep = []
    for m in ms:
        anc = nx.ancestors(g.g, g.args(m)[1])
        if not any(o in anc for o in ms if o != m):
            keep.append(m)
    return keep


def merge_sibling_gemms(ctx: Any, enabled: Callable[[str], bool]) -> str:
    """Merge every group of sibling GEMMs in ctx's (forward) graph; returns the summary."""
    if not enabled(PASS_NAME):
        return "off"
    g = ctx.graph
    roots = set(g.roots())
    memo: dict[int, Any] = {}
    groups: dict[Any, list[int]] = {}
    for n in g.topo():
        if g.op(n) != "matmul" or len(g.shape(n)) != 2 or g.prov(n).phase != "fwd":
            continue
        a, b = g.args(n)
        groups.setdefault((_key(g, a, memo), g.dtype(b).name, g.shape(b)[0],
                           g.dtype(n).name, freeze_attrs(g.attrs(n))), []).append(n)
    merged = [ms for ms in (_independent(g, ms) for ms in groups.values()) if len(ms) > 1]
    old = ctx.prov_override, ctx.created_by
    try:
        ctx.created_by = PASS_NAME
        for ms in merged:
            ctx.prov_override = g.prov(ms[0])
            with ctx.in_phase("fwd"):
                _merge(ctx, ms, roots)
    finally:
        ctx.prov_override, ctx.created_by = old
    summary = f"merged {sum(len(m) for m in merged)} GEMMs sharing an input into {len(merged)}"
    log.info("pass %s: %s", PASS_NAME, summary)
    return summary
