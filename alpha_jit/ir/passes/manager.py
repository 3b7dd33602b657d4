"""The pass manager: named Graph -> Graph passes, each switchable and each logging its change.

Passes run in a fixed order. `aj.compile(passes=...)` picks a subset by name and
`ALPHA_JIT_DISABLE_PASSES=a,b` switches some off; every pass reports one line of what it did,
which `dump-ir` prints with the graph after the pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from alpha_jit.errors import AlphaJitError
from alpha_jit.ir.graph import Graph
from alpha_jit.ir.host_gc import gc_paused


class PassConfigError(AlphaJitError, ValueError):
    """`passes=` names a pass that does not exist: the user's configuration, not our bug."""

log = logging.getLogger("alpha_jit.passes")


@dataclass(frozen=True)
class Pass:
    name: str
    # returns the new graph and a one-line summary; never mutates its argument (the graph the
    # previous pass left is kept as that pass's `dump-ir` snapshot): copy it before a rewrite
    fn: Callable[[Graph], tuple[Graph, str]]
    doc: str


_PASSES: list[Pass] = []
# passes on the forward graph, run by `loss.backward()` before autodiff (gemm_merge.py);
# `passes=` may name them too
FORWARD_PASSES = ("gemm_merge",)


def register_pass(name: str, doc: str):
    def deco(fn: Callable[[Graph], tuple[Graph, str]]):
        _PASSES.append(Pass(name, fn, doc))
        return fn

    return deco


def available() -> list[Pass]:
    from alpha_jit.ir.passes import cast_fold, cse, dce, gemm_transpose  # noqa: F401

    order = ["cse", "cast_fold", "gemm_transpose", "dce"]
    return sorted(_PASSES, key=lambda p: order.index(p.name) if p.name in order else 99)


def disabled_passes() -> set[str]:
    """The pass names `ALPHA_JIT_DISABLE_PASSES=a,b` switches off (graph, forward and
    scheduling passes alike)."""
    return {s.strip() for s in os.environ.get("ALPHA_JIT_DISABLE_PASSES", "").split(",")
            if s.strip()}


@contextmanager
def pass_errors(name: str) -> Iterator[None]:
    """A pass that fails (or leaves a broken graph) says which pass, and how to skip it."""
    from alpha_jit.errors import InternalCompilerError

    try:
        yield
    except InternalCompilerError as e:
        raise InternalCompilerError(
            f"pass {name}", f"{e}\n  ALPHA_JIT_DISABLE_PASSES={name} skips this pass",
            e.where) from e
    except AlphaJitError:
        raise
    except Exception as e:
        raise InternalCompilerError(
            f"pass {name}", f"{type(e).__name__}: {e}\n  ALPHA_JIT_DISABLE_PASSES={name} "
            "skips this pass") from e


def run_passes(graph: Graph, enabled: Iterable[str] | None = None
               ) -> tuple[Graph, list[tuple[str, str, Graph]]]:
    """Run the enabled passes; returns the final graph and (name, summary, graph) per pass."""
    disabled = disabled_passes()
    passes = available()
    names = {p.name for p in passes} | set(FORWARD_PASSES)
    if enabled is not None:
        enabled = set(enabled)
        unknown = enabled - names
        if unknown:
            raise PassConfigError(f"unknown passes {sorted(unknown)}; available: {sorted(names)}")
    from alpha_jit.ir.verify import verify

    memo: dict = {}  # shape rules' results, shared by the verifications below
    history = []
    with gc_paused():  # passes keep what they allocate: collections would find nothing
        verify(graph, "tracing", memo)
        for p in passes:
            if p.name in disabled or (enabled is not None and p.name not in enabled):
                continue
            with pass_errors(p.name):
                graph, summary = p.fn(graph)
                verify(graph, f"pass {p.name}", memo)
            log.info("pass %s: %s", p.name, summary)
            # no copy: the next pass leaves its argument alone, and nothing after the passes
            # rewrites the final graph (the memory-budget recompute works on a copy)
            history.append((p.name, summary, graph))
    return graph, history
