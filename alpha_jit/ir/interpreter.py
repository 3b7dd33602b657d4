"""The reference interpreter: runs any graph with numpy, one op's reference at a time.

It is the ground truth the compiled step is checked against (same graph, same inputs), and,
run in float64, the reference for numerical gradient checks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from alpha_jit import dtypes
from alpha_jit.ir.graph import Graph
from alpha_jit.ir.ops import registry

LEAVES = ("input", "state", "hparam")


def evaluate(graph: Graph, leaves: Mapping[int, np.ndarray],
             float_dtype: np.dtype | type | None = None) -> dict[int, np.ndarray]:
    """Value of every node. `leaves` maps input/state/hparam node ids to arrays; float values
    are computed in `float_dtype` (default: each node's own dtype, f32)."""
    vals: dict[int, np.ndarray] = {}
    for n in graph.topo():
        op, attrs, shape, dt = graph.op(n), graph.attrs(n), graph.shape(n), graph.dtype(n)
        npdt = np.dtype(float_dtype) if (float_dtype is not None and dt.is_float) \
            else dtypes.to_numpy(dt)
        if op in LEAVES:
            if n not in leaves:
                raise KeyError(f"no value fed for {op} node %{n} ({attrs.get('name', '')})")
            v = np.asarray(leaves[n])
        elif op == "full":
            v = np.full(shape, attrs["value"])
        else:
            v = registry.get(op).ref([vals[a] for a in graph.args(n)], attrs)
        v = np.asarray(v)
        if v.shape != shape:
            raise AssertionError(f"reference of {op} (%{n}) gave shape {v.shape}, "
                                 f"expected {shape}")
        vals[n] = round_to(v.astype(npdt, copy=False), dt)
    return vals


def round_to(v: np.ndarray, dt: dtypes.DType) -> np.ndarray:
    """Round f32 values to what a kernel storing them as `dt` keeps (compute stays f32)."""
    if dt == dtypes.float16:
        return v.astype(np.float16).astype(v.dtype)
    if dt == dtypes.bfloat16:
        return dtypes.bf16_to_f32(dtypes.f32_to_bf16(v.astype(np.float32))).astype(v.dtype)
    return v


def run(graph: Graph, leaves: Mapping[int, np.ndarray],
        float_dtype: np.dtype | type | None = None) -> tuple[list[np.ndarray], dict]:
    """(returned outputs, {state key: new value}) of one step."""
    vals = evaluate(graph, leaves, float_dtype)
    outs = [vals[o] for o in graph.outputs]
    writes = {k: vals[n] for k, n in graph.state_writes.items()}
    return outs, writes
