"""The pass manager: passes can be chosen or switched off, and each says what it did."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj


def f(x):
    unused = x.exp()  # noqa: F841  (dead: DCE removes it)
    return (x * 2.0 + x * 2.0).sum()  # x * 2.0 twice: CSE merges it


def _traced(monkeypatch, env: str | None = None, passes=None):
    if env is not None:
        monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", env)
    return aj.compile(f, passes=passes).trace(np.ones((3, 4), np.float32))


def test_passes_report_and_shrink_the_graph(monkeypatch):
    t = _traced(monkeypatch)
    names = [name for name, _, _ in t.pass_history]
    assert names == ["cse", "cast_fold", "gemm_transpose", "dce"]
    summaries = dict((n, s) for n, s, _ in t.pass_history)
    assert "merged" in summaries["cse"] and "removed" in summaries["dce"]
    assert not t.graph.nodes_with_op("exp")
    assert len(t.graph.nodes_with_op("mul")) == 1


def test_disable_by_env_and_choose_by_argument(monkeypatch):
    t = _traced(monkeypatch, env="cse")
    assert [n for n, _, _ in t.pass_history] == ["cast_fold", "gemm_transpose", "dce"]
    assert len(t.graph.nodes_with_op("mul")) == 2
    monkeypatch.delenv("ALPHA_JIT_DISABLE_PASSES")
    t = _traced(monkeypatch, passes=["cse"])
    assert [n for n, _, _ in t.pass_history] == ["cse"]
    with pytest.raises(ValueError, match="unknown passes"):
        _traced(monkeypatch, passes=["no-such-pass"])


def test_results_do_not_depend_on_passes(monkeypatch):
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with_all = float(aj.compile(f)(x))
    monkeypatch.setenv("ALPHA_JIT_DISABLE_PASSES", "cse,dce")
    without = float(aj.compile(f)(x))
    assert with_all == pytest.approx(without, rel=1e-6)
    assert with_all == pytest.approx(float((x * 4).sum()), rel=1e-5)


def test_a_failing_pass_names_itself_and_the_escape_hatch(monkeypatch):
    from alpha_jit.errors import InternalCompilerError
    from alpha_jit.ir.passes import manager

    def broken(graph):
        raise KeyError("boom")

    monkeypatch.setattr(manager, "_PASSES", [manager.Pass("cse", broken, "broken")])
    with pytest.raises(InternalCompilerError, match="(?s)pass cse.*ALPHA_JIT_DISABLE_PASSES=cse"):
        _traced(monkeypatch)
