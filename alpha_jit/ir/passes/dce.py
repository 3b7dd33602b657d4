"""Dead-code elimination: drop every node whose value reaches no output and no state write.

Tracing records everything the user's Python touched (a forward value never used by the loss,
a gradient nobody reads); only what flows into a returned value or a state update is kept.
One sweep backwards from all roots at once: a graph search per root was 70% of the trace time
at the gpt2 shape.
"""

from __future__ import annotations

from alpha_jit.ir.graph import Graph
from alpha_jit.ir.passes.manager import register_pass


@register_pass("dce", "remove nodes that reach no output or state write")
def dce(graph: Graph) -> tuple[Graph, str]:
    live: set[int] = set()
    stack = list(graph.roots())
    pred = graph.g._pred
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(u for u in pred[n] if u not in live)
    dead = [n for n in graph.g._node if n not in live]
    g = graph
    if dead:  # nothing dead: no copy to make
        g = graph.copy()
        g.g.remove_nodes_from(dead)
    return g, f"removed {len(dead)} dead nodes, {len(g)} remain"
