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

from alpha_jit import dtypes
from alpha_jit.errors import InternalCompilerError
from alpha_jit.ir.graph import Graph
from alpha_jit.ir.ops import registry

_LEAVES = ("input", "constant")  # lowering classes whose shape comes from attrs, not args


def verify(graph: Graph, stage: str, memo: dict | None = None) -> None:
    """Raise InternalCompilerError if `graph` breaks an invariant; `stage` names who made it.
    `memo`: shape rules' results by their exact inputs, shared by the verifications of one
    pipeline (most nodes reach every pass unchanged; a rule is a pure function of its op,
    argument shapes and dtypes, and attrs)."""
    g = graph.g
    if not _acyclic(g):
        cycle = nx.find_cycle(g)
        raise InternalCompilerError(f"the graph after {stage}",
                                    f"cycle through %{cycle[0][0]} ({len(cycle)} edges)")
    ops = registry.all_ops()
    memo = {} if memo is None else memo
    # networkx's adjacency dicts read directly: this runs after every pass, over every node
    nodes, pred = g._node, g._pred
    for n, d in nodes.items():
        op = d["op"]
        opdef = ops.get(op)
        if opdef is None:
            raise InternalCompilerError(f"the graph after {stage}",
                                        f"%{n} uses op {op!r}, which is not registered",
                                        d["prov"].where())
        ins = pred[n]
        if not ins or opdef.lowering in _LEAVES:  # leaves (iota too) take shapes from attrs
            continue
        args = _args(ins)
        if args is None:
            keys = sorted(k for slots in ins.values() for k in slots)
            raise InternalCompilerError(f"the graph after {stage}",
                                        f"%{n} = {op} has argument slots {keys}",
                                        d["prov"].where())
        shapes = tuple([nodes[a]["shape"] for a in args])
        arg_dtypes = [nodes[a]["dtype"] for a in args]
        attrs = d["attrs"]
        key = (op, shapes, tuple([_DTYPE_KEY.get(id(t), t) for t in arg_dtypes]),
               tuple([(k, _exact(v)) for k, v in attrs.items()]))
        try:
            out = memo.get(key)
        except TypeError:  # an attr that cannot be a key: ask the rule every time
            key = out = None
        if out is None:
            try:
                out = opdef.infer(list(shapes), arg_dtypes, attrs)
            except Exception as e:  # the rule rejects its own arguments: the pass broke them
                raise InternalCompilerError(
                    f"the graph after {stage}", f"%{n} = {op}("
                    + ", ".join(f"%{a}: {graph.dtype(a)}{list(graph.shape(a))}" for a in args)
                    + f") is invalid: {e}", d["prov"].where()) from None
            if key is not None:
                memo[key] = out
        shape, dtype = out
        if tuple(shape) != d["shape"] or (dtype is not d["dtype"] and dtype != d["dtype"]):
            raise InternalCompilerError(
                f"the graph after {stage}", f"%{n} = {op} is stored as {d['dtype']}"
                f"{list(d['shape'])} but its arguments give {dtype}{list(shape)}",
                d["prov"].where())
    for o in graph.outputs:
        if o not in g:
            raise InternalCompilerError(f"the graph after {stage}", f"output %{o} was removed")
    for key, n in graph.state_writes.items():
        if n not in g:
            raise InternalCompilerError(f"the graph after {stage}",
                                        f"the write of state {key} (%{n}) was removed")


def _args(ins: dict) -> list | None:
    """A node's arguments in slot order from its predecessor dict (argument node -> slots), or
    None unless the slots are exactly 0..k-1."""
    if len(ins) == 1:  # one argument node (most ops; x * x uses it twice)
        for u, slots in ins.items():
            if len(slots) == 1:
                return [u] if 0 in slots else None
            return [u] * len(slots) if sorted(slots) == list(range(len(slots))) else None
    pairs = sorted([(k, u) for u, slots in ins.items() for k in slots])
    for i, (k, _) in enumerate(pairs):
        if k != i:
            return None
    return [u for _, u in pairs]


# alpha_jit's dtypes as memo keys: hashing a DType (a dataclass) runs Python code on every
# lookup; these objects live as long as the module (held here), so their ids stay theirs
_DTYPES = (dtypes.float32, dtypes.float16, dtypes.bfloat16, dtypes.int32)
_CANONICAL = object()  # tags those keys: no attr value or stored dtype can equal one
_DTYPE_KEY = {id(t): (_CANONICAL, t.name) for t in _DTYPES}


def _exact(v: object) -> object:
    """An attr value as part of a rule memo key: equal only for values no rule can tell apart
    (types kept: 1.0 == 1 == True; floats by their bits: -0.0 == 0.0)."""
    if id(v) in _DTYPE_KEY:
        return _DTYPE_KEY[id(v)]
    if isinstance(v, tuple | list):
        return type(v), tuple([_exact(x) for x in v])
    if isinstance(v, float):
        return type(v), v.hex()
    return type(v), v


def _acyclic(g: nx.MultiDiGraph) -> bool:
    """Whether g has no cycle (Kahn's algorithm on the adjacency dicts, parallel edges counted
    once: what `nx.is_directed_acyclic_graph` answers, at a fraction of its cost)."""
    succ = g._succ
    indeg = {v: len(ps) for v, ps in g._pred.items()}
    ready = [v for v, d in indeg.items() if not d]
    seen = 0
    while ready:
        u = ready.pop()
        seen += 1
        for v in succ[u]:
            indeg[v] -= 1
            if not indeg[v]:
                ready.append(v)
    return seen == len(indeg)
