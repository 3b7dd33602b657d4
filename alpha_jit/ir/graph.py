"""The graph IR: a networkx MultiDiGraph of single-output ops with provenance.

Every value in a traced step is a node: `op`, `attrs`, output `shape`/`dtype`, and where it came
from (user file:line, module path, phase, creating pass). An edge u -> v with key i means "u is
argument i of v"; a MultiDiGraph because one value can feed the same op twice (x * x).
Passes rewrite this object; lowering reads it; `dump-ir` prints it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
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
            prov: Provenance) -> int:
        n = next(self._ids)
        self.g.add_node(n, op=op, attrs=dict(attrs), shape=tuple(shape), dtype=dtype, prov=prov)
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
        edges = sorted(self.g.in_edges(n, keys=True), key=lambda e: e[2])
        return [u for u, _, _ in edges]

    def users(self, n: int) -> list[int]:
        return sorted({v for _, v in self.g.out_edges(n)})

    def topo(self) -> list[int]:
        """Deterministic topological order (ties broken by node id = creation order), except
        that a node a pass created to serve later readers (recompute) comes right before its
        first reader rather than last."""
        late = {n for n, d in self.g.nodes(data=True) if d["prov"].created_by == "recompute"}
        if not late:
            return list(nx.lexicographical_topological_sort(self.g))
        # the others in their usual order; each late node just before its first reader (its
        # inputs come earlier anyway: they precede that reader)
        h = nx.DiGraph(self.g.subgraph(set(self.g) - late))
        for n in late:  # keep what flows through a late node ordered: its inputs first
            ins, outs = self._around(n, late, up=True), self._around(n, late, up=False)
            h.add_edges_from((a, c) for a in ins for c in outs)
        base = nx.lexicographical_topological_sort(h)
        key: dict[int, tuple[int, int]] = {n: (i, 0) for i, n in enumerate(base)}
        from alpha_jit.ir.ops import registry

        def view(u: int) -> bool:
            return registry.get(self.op(u)).lowering == "view"

        def first_use(n: int) -> tuple[int, int]:  # a view is read where its readers are
            keys = [first_use(u) if view(u) else key[u] for u in self.users(n)]
            return min(keys, default=(len(key), 0))

        for n in reversed(list(nx.lexicographical_topological_sort(self.g))):
            if n in late:
                first = first_use(n)
                key[n] = (first[0], first[1] - 1)
        # by those keys, each node still after its arguments (a base view may sit before its
        # late source)
        return list(nx.lexicographical_topological_sort(self.g, key=key.__getitem__))

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
        out = Graph(self.g.copy(), list(self.outputs), dict(self.state_writes))
        out._ids = itertools.count(max(self.g.nodes, default=-1) + 1)
        return out

    # ---- editing (for passes) ---------------------------------------------------------------
    def replace_uses(self, old: int, new: int) -> None:
        """Point every use of `old` (edges, outputs, state writes) at `new`."""
        for _, v, k in list(self.g.out_edges(old, keys=True)):
            self.g.remove_edge(old, v, key=k)
            self.g.add_edge(new, v, key=k)
        self.outputs = [new if o == old else o for o in self.outputs]
        self.state_writes = {s: (new if n == old else n) for s, n in self.state_writes.items()}

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
