"""Common-subexpression elimination: one node per (op, attrs, args) value.

Autodiff and the optimizer re-derive the same constants and views many times (`1.0`, `w.T`,
`x > 0`); merging them keeps kernels and the memory plan small. Leaves are never merged:
two inputs or two state reads are distinct values even when they look alike.
"""

from __future__ import annotations

from alpha_jit.ir.graph import Graph, freeze_attrs
from alpha_jit.ir.passes.manager import register_pass

_NEVER = ("input", "state", "hparam")


@register_pass("cse", "merge nodes computing the same op on the same arguments")
def cse(graph: Graph) -> tuple[Graph, str]:
    g = graph  # copied at the first merge: until then the input is the same graph
    seen: dict[tuple, int] = {}
    merged = 0
    nodes = graph.g._node
    for n in graph.topo():
        d = nodes.get(n)  # the copy's node data, once there is a copy
        if d is None or d["op"] in _NEVER:
            continue
        key = (d["op"], freeze_attrs(d["attrs"]), tuple(g.args(n)), d["shape"], d["dtype"].name)
        if key in seen:
            if g is graph:
                g = graph.copy()
                nodes = g.g._node
            g.replace_uses(n, seen[key])
            g.remove(n)
            merged += 1
        else:
            seen[key] = n
    return g, f"merged {merged} duplicate nodes"
