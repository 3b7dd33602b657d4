"""The graph verifier: run after tracing and after every pass, so a pass that breaks the graph
is caught where it did it, not three stages later as a wrong kernel.

Checks what every later stage relies on (JAX's `typecheck_jaxpr` is the model): the graph is
acyclic; every node's op is registered; every non-leaf node's stored shape and dtype are what
its op's rule infers from its arguments (so a rewrite cannot leave a stale shape behind); the
outputs and state writes name nodes that exist, and a state write keeps the state's shape and
dtype. A violation is an `InternalCompilerError` naming the stage, the node and the user's line.
"""

from __future__ import annotations

import networkx as nx

from alpha_jit.errors import InternalCompilerError
from alpha_jit.ir.graph import Graph
from alpha_jit.ir.ops import registry

_LEAVES = ("input", "constant")  # lowering classes whose shape comes from attrs, not args


def verify(graph: Graph, stage: str) -> None:
    """Raise InternalCompilerError if `graph` breaks an invariant; `stage` names who made it."""
    g = graph.g
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise InternalCompilerError(f"the graph after {stage}",
                                    f"cycle through %{cycle[0][0]} ({len(cycle)} edges)")
    ops = registry.all_ops()
    for n in g.nodes:
        op = graph.op(n)
        where = graph.prov(n).where()
        if op not in ops:
            raise InternalCompilerError(f"the graph after {stage}",
                                        f"%{n} uses op {op!r}, which is not registered", where)
        opdef = ops[op]
        args = graph.args(n)
        if opdef.lowering in _LEAVES or not args:  # leaves (iota too) take shapes from attrs
            continue
        keys = sorted(k for _, _, k in g.in_edges(n, keys=True))
        if keys != list(range(len(args))):
            raise InternalCompilerError(f"the graph after {stage}",
                                        f"%{n} = {op} has argument slots {keys}", where)
        try:
            shape, dtype = opdef.infer([graph.shape(a) for a in args],
                                       [graph.dtype(a) for a in args], graph.attrs(n))
        except Exception as e:  # the rule rejects its own arguments: the pass broke them
            raise InternalCompilerError(
                f"the graph after {stage}", f"%{n} = {op}("
                + ", ".join(f"%{a}: {graph.dtype(a)}{list(graph.shape(a))}" for a in args)
                + f") is invalid: {e}", where) from None
        if tuple(shape) != graph.shape(n) or dtype != graph.dtype(n):
            raise InternalCompilerError(
                f"the graph after {stage}", f"%{n} = {op} is stored as {graph.dtype(n)}"
                f"{list(graph.shape(n))} but its arguments give {dtype}{list(shape)}", where)
    for o in graph.outputs:
        if o not in g:
            raise InternalCompilerError(f"the graph after {stage}", f"output %{o} was removed")
    for key, n in graph.state_writes.items():
        if n not in g:
            raise InternalCompilerError(f"the graph after {stage}",
                                        f"the write of state {key} (%{n}) was removed")
