"""The graph's fast paths answer exactly what networkx answers; passes never edit their input.

`Graph.args/users/copy/topo/replace_uses` read and edit networkx's adjacency dicts directly
(compile time); these tests hold them to networkx's own results on random multigraphs,
including parallel edges and edges moved after creation (which reorder the predecessor dicts).
The pass manager keeps each pass's result uncopied as its `dump-ir` snapshot, which holds only
while every pass copies before it rewrites."""

from __future__ import annotations

import gc
import random

import networkx as nx
import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit.ir.graph import Graph, copy_multidigraph, lex_topo, lexicographical_topo
from alpha_jit.ir.host_gc import gc_paused
from alpha_jit.ir.passes import cast_fold, cse, dce


def _random_graph(seed: int) -> nx.MultiDiGraph:
    r = random.Random(seed)
    g = nx.MultiDiGraph()
    order = r.sample(range(100), r.randint(1, 30))
    for n in order:
        g.add_node(n, a=r.random())
    for j, v in enumerate(order[1:], 1):
        for k in range(r.randint(0, 3)):
            g.add_edge(order[r.randrange(j)], v, key=k, w=r.random())
    for _ in range(r.randint(0, 6)):  # move some edges: predecessor dicts get reordered
        edges = list(g.edges(keys=True))
        if not edges:
            break
        u, v, k = r.choice(edges)
        g.remove_edge(u, v, key=k)
        g.add_edge(r.choice(order[:order.index(v)] or [u]), v, key=k)
    return g


def _layout(g: nx.MultiDiGraph) -> list:
    """Everything whose order or content a reader could observe."""
    return [list(g._node.items()), [(u, list(n.items())) for u, n in g._succ.items()],
            [(u, list(n.items())) for u, n in g._pred.items()], g.graph]


@pytest.mark.parametrize("seed", range(60))
def test_fast_paths_match_networkx(seed):
    g = _random_graph(seed)
    fast, slow = copy_multidigraph(g), g.copy()
    assert _layout(fast) == _layout(slow)
    assert all(fast._pred[v][u] is kd for u, nbrs in fast._succ.items()
               for v, kd in nbrs.items())  # one key dict per edge pair, as networkx keeps
    assert lexicographical_topo(g) == list(nx.lexicographical_topological_sort(g))
    rank = {n: random.Random(seed + n).randint(0, 3) for n in g}  # ties: insertion order
    assert lexicographical_topo(g, rank.__getitem__) == \
        list(nx.lexicographical_topological_sort(g, key=rank.__getitem__))
    graph = Graph(g)
    for n in g:
        assert graph.args(n) == [u for u, _, _ in sorted(g.in_edges(n, keys=True),
                                                         key=lambda e: e[2])]
        assert graph.users(n) == sorted({v for _, v in g.out_edges(n)})


@pytest.mark.parametrize("seed", range(40))
def test_replace_uses_edits_as_networkx_does(seed):
    g = _random_graph(seed)
    r = random.Random(seed)
    old, new = r.choice(list(g)), r.choice(list(g))  # old == new sometimes
    want = g.copy()
    for _, v, k in list(want.out_edges(old, keys=True)):
        want.remove_edge(old, v, key=k)
        want.add_edge(new, v, key=k)
    graph = Graph(g.copy(), [old, 7], {"s": old})
    graph.replace_uses(old, new)
    assert _layout(graph.g) == _layout(want)
    assert graph.outputs == [new, 7] and graph.state_writes == {"s": new}


def test_a_copy_is_independent_and_cycles_are_refused():
    g = _random_graph(3)
    h = copy_multidigraph(g)
    u, v, k = next(iter(h.edges(keys=True)))
    h.remove_edge(u, v, key=k)
    h.nodes[u]["a"] = "changed"
    assert g.has_edge(u, v, key=k) and g.nodes[u]["a"] != "changed"
    cyclic = nx.MultiDiGraph([(1, 2), (2, 1)])
    with pytest.raises(nx.NetworkXUnfeasible):
        lexicographical_topo(cyclic)
    with pytest.raises(nx.NetworkXUnfeasible):
        lex_topo({"a": {"b": (1,)}, "b": {"a": (1,)}})


def _step_graph() -> Graph:
    def f(x):
        unused = x.exp()  # noqa: F841  (dead: DCE removes it)
        y = (x * 2.0 + x * 2.0).exp()  # x * 2.0 twice: CSE merges it
        return y.reshape(4, 3).astype(aj.bfloat16).astype(aj.float32).sum()  # cast_fold: sunk

    return aj.compile(f, precision="bf16").trace(np.ones((3, 4), np.float32)).snapshots[-1][1]


@pytest.mark.parametrize("run", [cse.cse, cast_fold.cast_fold, dce.dce])
def test_passes_leave_their_input_alone(run):
    """The pass manager keeps each pass's result as the next pass's input and as its
    `dump-ir` snapshot without copying it: a pass must never rewrite its argument."""
    g = _step_graph()
    before = _layout(copy_multidigraph(g.g)), list(g.outputs), dict(g.state_writes)
    out, summary = run(g)
    assert out is not g, summary  # it rewrote something: on a copy
    assert (_layout(g.g), g.outputs, g.state_writes) == before


def test_pass_history_is_what_each_pass_left():
    def f(x):
        unused = x.exp()  # noqa: F841  (dead: DCE removes it)
        return (x * 2.0 + x * 2.0).sum()

    t = aj.compile(f).trace(np.ones((3, 4), np.float32))
    after = {name: g for name, _, g in t.pass_history}
    assert after["cse"].nodes_with_op("exp")  # still there: DCE removed it from its copy
    assert not after["dce"].nodes_with_op("exp") and after["dce"] is t.graph
    assert len(after["cse"].nodes_with_op("mul")) == 1


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a program that turned it off keeps it off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError
    assert gc.isenabled()


def test_a_pass_with_nothing_to_do_makes_no_copy():
    g = _step_graph()
    g, _ = dce.dce(cse.cse(g)[0])
    assert cse.cse(g)[0] is g and dce.dce(g)[0] is g
    assert cse.cse(g)[1] == "merged 0 duplicate nodes"
