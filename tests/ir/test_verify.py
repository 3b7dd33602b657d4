"""The graph verifier catches a broken graph at the pass that broke it."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit.errors import InternalCompilerError
from alpha_jit.ir.passes import manager
from alpha_jit.ir.verify import verify


def _step():
    @aj.compile
    def f(x, w):
        return (x @ w).relu().sum()

    return f


ARGS = (np.ones((4, 3), np.float32), np.ones((3, 5), np.float32))


def _traced():
    return _step().trace(*ARGS)


def test_traced_graphs_verify():
    traced = _traced()
    verify(traced.graph, "test")  # after every pass too: run_passes verifies


@pytest.mark.parametrize("breakage, message", [
    ("shape", "is stored as f32[4, 6] but its arguments give f32[4, 5]"),
    ("op", "uses op 'no_such_op', which is not registered"),
    ("cycle", "cycle through"),
    ("output", "output %"),
])
def test_a_pass_that_breaks_the_graph_is_named(monkeypatch, breakage, message):
    def broken(graph):
        g = graph.copy()
        mm = next(n for n in g.g.nodes if g.op(n) == "matmul")
        if breakage == "shape":
            g.g.nodes[mm]["shape"] = (4, 6)
        elif breakage == "op":
            g.g.nodes[mm]["op"] = "no_such_op"
        elif breakage == "cycle":
            g.g.add_edge(g.users(mm)[0], g.args(mm)[0], key=99)
        else:
            g.remove(g.outputs[0])
        return g, "broke it"

    real = manager.available

    def with_broken():
        return [*real(), manager.Pass("breaker", broken, "test")]

    monkeypatch.setattr(manager, "available", with_broken)
    with pytest.raises(InternalCompilerError, match="the graph after pass breaker") as e:
        _step()(*ARGS)
    assert message in str(e.value)


def _reshaped():
    @aj.compile
    def f(x):
        return x.reshape(2, 6).exp().sum()

    return f.trace(np.ones((3, 4), np.float32)).graph


def test_a_shared_rule_memo_sees_an_attr_changed_in_place():
    """run_passes shares one memo of shape-rule results between its verifications; it is
    keyed by the rule's exact inputs, so an attr edited in place is checked again."""
    g = _reshaped()
    memo: dict = {}
    verify(g, "first", memo)
    assert memo
    h = g.copy()  # node attrs are shared with g, as networkx copies them
    r = next(n for n in h.g.nodes if h.op(n) == "reshape")
    h.attrs(r)["shape"] = (4, 3)
    with pytest.raises(InternalCompilerError, match=r"is stored as f32\[2, 6\] but its "
                                                    r"arguments give f32\[4, 3\]"):
        verify(h, "second", memo)
    h.attrs(r)["shape"] = [2, 6]  # a list the rule accepts: a key the memo cannot hold
    verify(h, "third", memo)


@pytest.mark.parametrize("breakage, message", [
    ("slots", r"has argument slots \[0, 5\]"),
    ("other slots", r"has argument slots \[0, 0\]"),
    ("args", r"is invalid: "),
])
def test_broken_arguments_are_named(breakage, message):
    g = _reshaped()
    e = next(n for n in g.g.nodes if g.op(n) == "exp")
    if breakage == "slots":  # exp gets a second argument in a slot that does not exist
        g.g.add_edge(g.args(e)[0], e, key=5)
    elif breakage == "other slots":  # a second node in exp's slot 0
        g.g.add_edge(next(n for n in g.g.nodes if g.op(n) == "input"), e, key=0)
    else:  # reshape of 12 elements to 5
        r = g.args(e)[0]
        g.node(r)["attrs"] = {**g.attrs(r), "shape": (5,)}
    with pytest.raises(InternalCompilerError, match=message):
        verify(g, "test")
