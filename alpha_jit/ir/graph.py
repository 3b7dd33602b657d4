"""The graph IR: a networkx MultiDiGraph of single-output ops with provenance.

Every value in a traced step is a node: `op`, `attrs`, output `shape`/`dtype`, and where it came
from (user file:line, module path, phase, creating pass). An edge u -> v with key i means "u is
argument i of v"; a MultiDiGraph because one value can feed the same op twice (x * x).
Passes rewrite this object; lowering reads it; `dump-ir` prints it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Mapping, Sized
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import Any

import networkx as nx

from alpha_jit.dtypes import DType


@dataclass(frozen=True)
class Provenance:
    """Where a node comes from; survives every pass and reaches every kernel."""

    file: str = "?"
    line: int = 0
    func: str = "?"
    module: str = ""  # module path such as "blocks.3.attn.qkv"
    phase: str = "fwd"  # fwd | bwd | opt
    created_by: str = "trace"  # the pass that created the node
    model: str = ""  # "transformer.py:118": the line in alpha_jit's own layers, if any

    def where(self) -> str:
        mod = f" (module {self.module})" if self.module else ""
        return f"{self.file}:{self.line} in {self.func}{mod}"

    def source(self) -> str:
        """"file:line", plus the alpha_jit layer line behind it when there is one."""
        base = f"{self.file}:{self.line}"
        return f"{base} ({self.model})" if self.model else base

    def short(self) -> str:
        base = self.file.rsplit("/", 1)[-1]
        mod = f" {self.module}" if self.module else ""
        return f"{base}:{self.line}{mod} [{self.phase}]"

    def with_(self, **kw: Any) -> Provenance:
        return replace(self, **kw)


def freeze_attrs(attrs: dict) -> tuple:
    """Attrs as a sorted tuple of items: hashable, printable, stable across runs."""

    def fz(v: Any) -> Any:
        if isinstance(v, list | tuple):
            return tuple(fz(x) for x in v)
        if isinstance(v, DType):
            return v.name
        return v

    if not attrs:  # most nodes: nothing to sort
        return ()
    return tuple(sorted((k, fz(v)) for k, v in attrs.items()))


@dataclass
class Graph:
    """A traced step: the node graph plus what connects it to the outside world."""

    g: nx.MultiDiGraph = field(default_factory=nx.MultiDiGraph)
    outputs: list[int] = field(default_factory=list)
    # state key -> node holding the value written back at the end of the step
    state_writes: dict[Any, int] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    # ---- building -------------------------------------------------------------------------
    def add(self, op: str, args: list[int], attrs: dict, shape: tuple, dtype: DType,
            prov: Provenance, in_place_of: int | None = None) -> int:
        """A new node. `in_place_of`: a node a pass replaces; the new one is ordered as that
        one was (`topo`), not after everything the trace made (a weight gradient rebuilt at
        the end would otherwise run last and keep its operands alive through the step)."""
        n = next(self._ids)
        self.g.add_node(n, op=op, attrs=dict(attrs), shape=tuple(shape), dtype=dtype, prov=prov)
        if in_place_of is not None:
            self.g._node[n]["seq"] = self.g._node[in_place_of].get("seq", in_place_of)
        for i, a in enumerate(args):
            self.g.add_edge(a, n, key=i)
        return n

    # ---- reading --------------------------------------------------------------------------
    def node(self, n: int) -> dict:
        return self.g.nodes[n]

    def op(self, n: int) -> str:
        return self.g.nodes[n]["op"]

    def shape(self, n: int) -> tuple:
        return self.g.nodes[n]["shape"]

    def dtype(self, n: int) -> DType:
        return self.g.nodes[n]["dtype"]

    def attrs(self, n: int) -> dict:
        return self.g.nodes[n]["attrs"]

    def prov(self, n: int) -> Provenance:
        return self.g.nodes[n]["prov"]

    def args(self, n: int) -> list[int]:
        """Argument node ids of n in argument order."""
        # read networkx's adjacency dicts directly: the edge views cost 10x more, and this is
        # called tens of thousands of times per compile
        pred = self.g._pred.get(n)
        if pred is None:  # not a node: networkx's own error
            return [u for u, _, _ in self.g.in_edges(n, keys=True)]
        if len(pred) < 2:  # one argument node (maybe repeated): no ordering to do
            return [u for u, keys in pred.items() for _ in keys]
        edges = [(k, u) for u, keys in pred.items() for k in keys]
        edges.sort(key=_FIRST)  # stable: the in-edge order breaks (invalid) repeated slots
        return [u for _, u in edges]

    def users(self, n: int) -> list[int]:
        succ = self.g._succ.get(n)
        if succ is None:  # not a node: networkx's own error
            return sorted({v for _, v in self.g.out_edges(n)})
        return sorted(succ)

    def topo(self) -> list[int]:
        """Deterministic topological order (ties broken by node id = creation order, or by
        the id of the node a pass made it in place of), except that a node a pass created to
        serve later readers (recompute) comes right before its first reader rather than
        last."""
        nodes = self.g._node
        seq = {n: d["seq"] for n, d in nodes.items() if "seq" in d}
        order_key = (lambda n: (seq.get(n, n), n)) if seq else None
        late = {n for n, d in nodes.items() if d["prov"].created_by == "recompute"}
        if not late:
            return lexicographical_topo(self.g, key=order_key)
        # the others in their usual order; each late node just before its first reader (its
        # inputs come earlier anyway: they precede that reader)
        h = nx.DiGraph(self.g.subgraph(set(self.g) - late))
        for n in late:  # keep what flows through a late node ordered: its inputs first
            ins, outs = self._around(n, late, up=True), self._around(n, late, up=False)
            h.add_edges_from((a, c) for a in ins for c in outs)
        base = nx.lexicographical_topological_sort(h, key=order_key)
        key: dict[int, tuple[int, int]] = {n: (i, 0) for i, n in enumerate(base)}
        from alpha_jit.ir.ops import registry

        def view(u: int) -> bool:
            return registry.get(self.op(u)).lowering == "view"

        def first_use(n: int) -> tuple[int, int]:  # a view is read where its readers are
            keys = [first_use(u) if view(u) else key[u] for u in self.users(n)]
            return min(keys, default=(len(key), 0))

        for n in reversed(lexicographical_topo(self.g, key=order_key)):
            if n in late:
                first = first_use(n)
                key[n] = (first[0], first[1] - 1)
        # by those keys, each node still after its arguments (a base view may sit before its
        # late source)
        return lexicographical_topo(self.g, key=key.__getitem__)

    def _around(self, n: int, late: set[int], up: bool) -> set[int]:
        """The nearest nodes outside `late` above (inputs) or below (readers) node n."""
        out, stack = set(), [n]
        while stack:
            u = stack.pop()
            for v in (self.args(u) if up else self.users(u)):
                if v in late:
                    stack.append(v)
                else:
                    out.add(v)
        return out

    def roots(self) -> list[int]:
        """Nodes whose values leave the step: returned outputs and state writes."""
        return list(dict.fromkeys([*self.outputs, *self.state_writes.values()]))

    def nodes_with_op(self, op: str) -> list[int]:
        return [n for n in self.topo() if self.op(n) == op]

    def copy(self) -> Graph:
        out = Graph(copy_multidigraph(self.g), list(self.outputs), dict(self.state_writes))
        out._ids = itertools.count(max(self.g._node, default=-1) + 1)
        return out

    # ---- editing (for passes) ---------------------------------------------------------------
    def replace_uses(self, old: int, new: int) -> None:
        """Point every use of `old` (edges, outputs, state writes) at `new`."""
        succ, pred = self.g._succ, self.g._pred
        if old not in succ or new not in succ:  # networkx's errors, or its new node
            for _, v, k in list(self.g.out_edges(old, keys=True)):
                self.g.remove_edge(old, v, key=k)
                self.g.add_edge(new, v, key=k)
        else:  # the same remove_edge + add_edge per use on networkx's dicts (same orders, a
            # fresh attribute dict per moved edge), without its views: CSE moves thousands
            for v, keys in list(succ[old].items()):
                for k in list(keys):
                    kd = succ[old][v]
                    del kd[k]
                    if not kd:
                        del succ[old][v], pred[v][old]
                    if v in succ[new]:
                        kd = succ[new][v]
                        kd[k] = kd.get(k, {})
                    else:
                        succ[new][v] = pred[v][new] = {k: {}}
            _clear_cache(self.g)
        if old in self.outputs:
            self.outputs = [new if o == old else o for o in self.outputs]
        if old in self.state_writes.values():  # rarely: skip rebuilding a large dict
            self.state_writes = {s: (new if n == old else n)
                                 for s, n in self.state_writes.items()}

    def remove(self, n: int) -> None:
        self.g.remove_node(n)

    def rewire(self, n: int, op: str, args: list[int], attrs: dict) -> None:
        """Make node n compute `op` of `args` instead, keeping its id, shape, dtype and
        provenance (a rewrite before autodiff: tensors the user holds keep meaning n)."""
        self.g.remove_edges_from(list(self.g.in_edges(n, keys=True)))
        self.g.nodes[n]["op"], self.g.nodes[n]["attrs"] = op, dict(attrs)
        for i, a in enumerate(args):
            self.g.add_edge(a, n, key=i)

    def __len__(self) -> int:
        return self.g.number_of_nodes()

    # ---- printing ---------------------------------------------------------------------------
    def format(self, title: str = "graph") -> str:
        """A readable listing, one line per node, as `dump-ir` prints it."""
        lines = [f"== {title}: {len(self)} nodes =="]
        for n in self.topo():
            d = self.node(n)
            args = ", ".join(f"%{a}" for a in self.args(n))
            attrs = ", ".join(f"{k}={v}" for k, v in freeze_attrs(d["attrs"]))
            attrs = f" {{{attrs}}}" if attrs else ""
            shape = "x".join(map(str, d["shape"])) or "scalar"
            lines.append(f"  %{n} = {d['op']}({args}){attrs} : {d['dtype']}[{shape}]"
                         f"    # {d['prov'].short()}")
        outs = ", ".join(f"%{o}" for o in self.outputs)
        lines.append(f"  return ({outs})")
        for key, n in self.state_writes.items():
            lines.append(f"  state[{key}] <- %{n}")
        return "\n".join(lines)


_FIRST = itemgetter(0)
# networkx (3.3+) drops its cached conversions of a graph on every edit; older versions keep none
_clear_cache = getattr(nx, "_clear_cache", lambda g: None)


def copy_multidigraph(g: nx.MultiDiGraph) -> nx.MultiDiGraph:
    """What `g.copy()` returns (node and edge attribute dicts copied shallowly, adjacency in the
    same insertion order, each edge's key dict shared by its successor and predecessor entry),
    built with dict comprehensions instead of one `add_edge` per edge: 10x faster, and the
    pass manager copies the graph after every pass for `dump-ir`."""
    h = nx.MultiDiGraph()
    h.graph.update(g.graph)
    h._node.update({n: d.copy() for n, d in g._node.items()})
    succ: dict = {n: {} for n in g._node}
    pred: dict = {n: {} for n in g._node}
    for u, nbrs in g._succ.items():  # networkx's copy re-adds edges in this order
        su = succ[u]
        for v, keys in nbrs.items():
            su[v] = pred[v][u] = {k: d.copy() for k, d in keys.items()}
    h._succ.update(succ)
    h._pred.update(pred)
    return h


def lexicographical_topo(g: nx.MultiDiGraph,
                         key: Callable[[Hashable], Any] | None = None) -> list:
    """`list(nx.lexicographical_topological_sort(g, key))` for a MultiDiGraph: the same order
    (ties between equal keys broken by node insertion order) from its adjacency dicts, without
    networkx's per-node edge views. Raises networkx's NetworkXUnfeasible on a cycle, as it
    does."""
    return lex_topo(g._succ, key)


def lex_topo(succ: Mapping[Hashable, Mapping[Hashable, Sized]],
             key: Callable[[Hashable], Any] | None = None) -> list:
    """The lexicographical topological order of a DAG given as node -> {child: its edges} (a
    sized collection per child: networkx's key dicts, or a 1-tuple for a plain edge): among
    the nodes whose arguments are all placed, the smallest key first (ties: the earlier node
    in `succ`); without `key`, nodes are their own keys and must be unique and comparable."""
    indeg: dict = {}
    for nbrs in succ.values():
        for child, edges in nbrs.items():
            indeg[child] = indeg.get(child, 0) + len(edges)
    order = []
    if key is None:  # nodes are their own heap entries
        heap = [v for v in succ if not indeg.get(v)]
        heapq.heapify(heap)
        while heap:
            node = heapq.heappop(heap)
            for child, edges in succ[node].items():
                left = indeg[child] - len(edges)
                indeg[child] = left
                if not left:
                    heapq.heappush(heap, child)
            order.append(node)
    else:
        index = {n: i for i, n in enumerate(succ)}
        heap = [(key(v), index[v], v) for v in succ if not indeg.get(v)]
        heapq.heapify(heap)
        while heap:
            node = heapq.heappop(heap)[2]
            for child, edges in succ[node].items():
                left = indeg[child] - len(edges)
                indeg[child] = left
                if not left:
                    heapq.heappush(heap, (key(child), index[child], child))
            order.append(node)
    if len(order) != len(succ):
        raise nx.NetworkXUnfeasible("Graph contains a cycle or graph changed during iteration")
    return order
