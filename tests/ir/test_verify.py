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
