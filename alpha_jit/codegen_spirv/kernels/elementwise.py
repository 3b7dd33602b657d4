"""The fused elementwise kernel family: a flat grid of output elements, a few per thread, any
number of strided inputs and contiguous outputs, the body an SSA list of scalar ops evaluated by
the IR's rules.

Why: after fusion most of a training step is elementwise regions (bias, GELU, residuals, the
optimizer update). One generator, specialised by the spec's shapes/strides/dtypes/expression,
covers all of them; broadcasting and transposed views are just strides, so no copies are made.

Spec (family "elementwise"), params as (key, value) pairs:
    ("shape", out_shape)                       iteration space, row-major
    ("inputs", ((dtype, strides, offset), ...))  element offset + sum(idx[d] * strides[d])
    ("exprs", ((op, dtype, attrs, args), ...))   args: ("in", i) | ("e", j) | ("const", v, dtype)
                                                        | ("iota", axis)  (index along axis, i32)
    ("outputs", ((dtype, expr_index), ...))     each contiguous over the shape
    optional ("aliased", True): an input and an output may share memory (in-place), so every
    binding is decorated Aliased
Buffers bind inputs first, then outputs. Floats compute in f32, i32 in i32; "bool" tensors are
stored as i32 0/1. Push constants (count, base) split huge tensors over several dispatches.

Memory-bound kernels need bytes in flight (Little's law): above `UNROLL_MIN_ELEMENTS` each
thread owns `unroll_for` elements, `local` apart so every load stays coalesced (`FlatGrid`), and
issues all their loads before any store (`emit_unrolled_region`): with ("aliased", True) the
driver may not hoist a later element's loads above an earlier element's store, and elements are
disjoint, so loading first keeps in-place semantics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dsl import KernelBuilder, Value, cap, max_groups_x, pack_push_constants
from ..kernel import Dispatch, KernelBinary, KernelSpec
from ..scalar import NumpyScalarEmitter, ScalarEmitter, compute_dtype

ScalarRule = Callable[[str, Any, Any, list], Any]
DEFAULT_LOCAL_SIZE = 256  # a multiple of every subgroup size in the wild (4..64)
UNROLL_MIN_ELEMENTS = 1 << 16  # smaller tensors keep one element per thread: their parallelism
UNROLL = 4  # elements per thread above that: four loads in flight per thread and input
UNROLL_16BIT = 8  # when all data is 16-bit: a load is half the bytes, so twice as many


def storage_dtype(dtype: str) -> str:
    """Buffer element dtype of a tensor dtype ("bool" lives in i32 0/1)."""
    return "i32" if dtype == "bool" else dtype


# elements of one 16-byte load or store (a u32x4 of bf16 pairs, an f32x4), by dtype
VECTOR_WIDTH = {"bf16": 8, "f32": 4}
VECTOR_VIEW = {"bf16": "u32x4", "f32": "f32x4"}


def unpack_vector(kb: KernelBuilder, v: Value) -> list[Value]:
    """A 16-byte vector's elements as f32: 4 f32, or 8 bf16 (low half of each word first)."""
    words = [kb.extract(v, c) for c in range(4)]
    if v.dtype == "f32x4":
        return words
    return [kb.bitcast(w << 16 if h == 0 else w & 0xFFFF0000, "f32") for w in words for h in (0, 1)]


def pack_vector(kb: KernelBuilder, dtype: str, values: Sequence[Value]) -> Value:
    """`unpack_vector`'s inverse for `dtype`'s vector: 4 f32, or 8 values rounded to bf16
    (nearest even, NaN kept, as a bf16 element store rounds)."""
    if len(values) != VECTOR_WIDTH[dtype]:
        raise ValueError(f"a {dtype} vector holds {VECTOR_WIDTH[dtype]} values, not {len(values)}")
    if dtype == "f32":
        return kb.vector("f32x4", list(values))
    bits = [kb.bf16_bits(v) for v in values]
    return kb.vector("u32x4", [bits[2 * c] | (bits[2 * c + 1] << 16) for c in range(4)])


def load_run(kb: KernelBuilder, view: Any, dtype: str, at: Value, count: int) -> list[Value]:
    """`count` elements (a multiple of the vector width) from element `at` (likewise) of a
    16-byte `view` of a `dtype` binding, as f32."""
    width = VECTOR_WIDTH[dtype]
    return [x for h in range(0, count, width)
            for x in unpack_vector(kb, view.load((at + h) / width))]


def store_run(kb: KernelBuilder, view: Any, dtype: str, at: Value, values: Sequence[Value]) -> None:
    """`load_run`'s inverse: the values from element `at`, rounded as an element store rounds."""
    width = VECTOR_WIDTH[dtype]
    for h in range(0, len(values), width):
        view.store((at + h) / width, pack_vector(kb, dtype, values[h:h + width]))


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _attrs(attrs: object) -> object:
    # Specs carry attrs as hashable ((key, value), ...); rules read them as a dict.
    if isinstance(attrs, tuple) and all(isinstance(a, tuple) and len(a) == 2 for a in attrs):
        return dict(attrs)
    return attrs


def launch_plan(n: int, local: int, caps: object) -> list[tuple[int, int]]:
    """[(groups, base_element)] covering n elements, each within maxComputeWorkGroupCount[0]."""
    total = math.ceil(n / local)
    maxg = max_groups_x(caps)
    return [(min(maxg, total - g0), g0 * local) for g0 in range(0, total, maxg)]


def local_size_for(caps: object, want: int = DEFAULT_LOCAL_SIZE) -> int:
    return int(min(want, int(cap(caps, "max_workgroup_invocations", want))))  # type: ignore


def unroll_for(n: int, dtypes: Iterable[str]) -> int:
    """Elements per thread of a flat kernel over n elements whose streamed tensors have
    `dtypes` (see the constants above)."""
    if n < UNROLL_MIN_ELEMENTS:
        return 1
    return UNROLL_16BIT if all(d in ("bf16", "f16") for d in dtypes) else UNROLL


@dataclass(frozen=True, eq=False)  # Values compare into kernel code, not Python bools
class Lane:
    """One of a thread's elements: `at` its index clamped into the region (every load and all
    index math use it, so none is out of bounds and no branch guards them); `ok` whether the
    element exists (None: always), the guard of its stores."""

    at: Value
    ok: Value | None


@dataclass(frozen=True)
class FlatGrid:
    """A 1-D launch over flat element indices, `unroll` elements per thread `local` apart, so
    each load instruction of a workgroup is one coalesced sweep: element u of thread t of
    workgroup w is base + w * block + u * local + t (block = local * unroll). A dispatch's push
    constants are (count, base): the element count and its first element, a multiple of block,
    so a tensor over maxComputeWorkGroupCount[0] blocks takes several dispatches."""

    local: int
    unroll: int

    @property
    def block(self) -> int:
        """Elements per workgroup."""
        return self.local * self.unroll

    @property
    def variant(self) -> str:
        return f"flat x{self.local} u{self.unroll}"

    def dispatches(self, n: int, caps: object) -> list[Dispatch]:
        """Dispatches covering n elements in whole blocks."""
        return [Dispatch((g, 1, 1), pack_push_constants([("u32", n), ("u32", base)]))
                for g, base in launch_plan(n, self.block, caps)]

    def block_start(self, kb: KernelBuilder, base: Value) -> Value:
        """The first element of this workgroup's block (u32, workgroup-uniform)."""
        return base + kb.workgroup_id(0) * self.block

    def lanes(self, kb: KernelBuilder, start: Value, n: int,
              count: Value | None = None) -> list[Lane]:
        """This thread's elements of the block at `start` (u32) of a region of n elements
        (`count`: n as a runtime value, else a constant). Where n fills whole blocks every
        element exists: no clamp, no guard."""
        first = start + kb.local_id(0)
        ragged = n % self.block != 0
        bound = kb.value(n if count is None else count, "u32")
        last = bound - 1 if ragged else None
        lanes = []
        for u in range(self.unroll):
            lin = first + u * self.local if u else first
            lanes.append(Lane(kb.fmin(lin, last), lin < bound) if last is not None
                         else Lane(lin, None))
        return lanes


class Indexer:
    """Row-major index decomposition of the linear element id, computed once per axis.
    `known`: axis indices the caller already has (a GEMM's batch, row and column), as i32."""

    def __init__(self, kb: KernelBuilder, lin: Value, shape: Sequence[int],
                 known: dict[int, Value] | None = None):
        self.kb, self.lin, self.shape = kb, lin, tuple(shape)
        self._idx: dict[int, Value] = dict(known or {})

    def axis(self, d: int) -> Value:
        if d not in self._idx:
            inner = math.prod(self.shape[d + 1:])
            v = self.lin if inner == 1 else self.lin / inner
            if d > 0:  # the outermost axis needs no wrap-around
                v = v % self.shape[d]
            self._idx[d] = self.kb.cast(v, "i32")
        return self._idx[d]

    def offset(self, strides: Sequence[int], offset: int) -> Value:
        if tuple(strides) == contiguous_strides(self.shape):
            return self.kb.cast(self.lin, "i32") + offset if offset else self.kb.cast(self.lin,
                                                                                     "i32")
        terms = [self.axis(d) * st if st != 1 else self.axis(d)
                 for d, st in enumerate(strides) if st != 0 and self.shape[d] != 1]
        total = terms[0] if terms else self.kb.i32(0)
        for t in terms[1:]:
            total = total + t
        return total + offset if offset else total


def _windowed_load(kb: KernelBuilder, ix: Indexer, buf: object, dt: str,
                   strides: Sequence[int], off: int, window: Sequence[tuple[int, int]]) -> Value:
    """Load where lo <= idx[d] < hi on every windowed axis, else 0 (the `pad` op)."""
    cond = None
    for d, (lo, hi) in enumerate(window):
        if lo == 0 and hi >= ix.shape[d]:
            continue
        c = (ix.axis(d) >= lo) & (ix.axis(d) < hi)
        cond = c if cond is None else cond & c
    if cond is None:
        return buf.load(ix.offset(strides, off))  # type: ignore[attr-defined]
    # index math before the branch: values cached by the indexer must dominate later uses
    at = ix.offset(strides, off)
    var = kb.var(compute_dtype(storage_dtype(dt)), 0)
    with kb.if_(cond):
        var.set(buf.load(at))  # type: ignore[attr-defined]
    return var.get()


def load_inputs(kb: KernelBuilder, ix: Indexer, inputs: Sequence[tuple],
                in_bufs: Sequence[Any], exprs: Sequence[tuple],
                given: dict[int, Value] | None = None) -> dict[int, Value]:
    """Phase 1 of a region at element `ix.lin`: each input the expressions use, loaded once,
    in order of first use (a padded input through its window: 0 outside); `given`: inputs
    the caller already loaded."""
    loaded: dict[int, Value] = dict(given or {})
    for _op, _dt, _attrs, args in exprs:
        for i in (a[1] for a in args if a[0] == "in"):
            if i in loaded:
                continue
            dt, strides, off, *window = inputs[i]
            if window:
                v = _windowed_load(kb, ix, in_bufs[i], dt, strides, off, window[0])
            else:
                v = in_bufs[i].load(ix.offset(strides, off))
            loaded[i] = kb.cast(v, "bool") if dt == "bool" else v
    return loaded


def eval_region(kb: KernelBuilder, em: ScalarEmitter, ix: Indexer, loaded: dict[int, Value],
                exprs: Sequence[tuple], outputs: Sequence[tuple], scalar_rule: ScalarRule,
                name: str, acc: Value | None = None) -> list[Value]:
    """Phase 2 of a region: the expressions on the loaded inputs, evaluated with the IR's
    scalar rules; returns each output's value in its buffer's compute dtype.
    `acc`: the value of argument ("acc",) (a GEMM epilogue's accumulator)."""
    values: list[Value] = []

    def arg(a: tuple) -> Value:
        tag = a[0]
        if tag == "in":
            return loaded[a[1]]
        if tag == "e":
            return values[a[1]]
        if tag == "const":
            return em.const(a[1], a[2])
        if tag == "iota":  # axis -1: the linear element index
            return ix.axis(a[1]) if a[1] >= 0 else kb.cast(ix.lin, "i32")
        if tag == "acc" and acc is not None:
            return acc
        raise ValueError(f"{name}: unknown expression argument {a!r}")

    for op, dt, attrs, args in exprs:
        values.append(round_to(kb, scalar_rule(op, em, _attrs(attrs), [arg(a) for a in args]),
                               dt))
    return [kb.cast(values[j], compute_dtype(storage_dtype(dt))) for dt, j in outputs]


def emit_unrolled_region(kb: KernelBuilder, em: ScalarEmitter, lanes: Sequence[Lane],
                         shape: Sequence[int], inputs: Sequence[tuple], in_bufs: Sequence[Any],
                         exprs: Sequence[tuple], outputs: Sequence[tuple],
                         out_bufs: Sequence[Any], scalar_rule: ScalarRule, name: str) -> None:
    """A region at each of a thread's elements (`FlatGrid.lanes`): first every element's loads
    (clamped indices: no branch), then per element its expressions and its guarded stores."""
    ixs = [Indexer(kb, lane.at, shape) for lane in lanes]
    loaded = [load_inputs(kb, ix, inputs, in_bufs, exprs) for ix in ixs]
    for lane, ix, ld in zip(lanes, ixs, loaded, strict=True):
        values = eval_region(kb, em, ix, ld, exprs, outputs, scalar_rule, name)
        with kb.when(lane.ok):
            for buf, v in zip(out_bufs, values, strict=True):
                buf.store(ix.lin, v)


def round_to(kb: KernelBuilder, v: Value, dtype: str) -> Value:
    """A 16-bit float node's value as it would be stored (nearest even), kept in f32: a fused
    intermediate rounds exactly where the reference interpreter rounds every node, so
    overflow to inf and the bits of every result agree with it."""
    if dtype == "bf16":
        return kb.bitcast(kb.bf16_bits(v) << 16, "f32")
    if dtype == "f16":
        return kb.cast(kb.cast(v, "f16"), "f32")
    return v


class EpilogueStore:
    """Where another family's kernel puts each finished value: its plain output, or, with
    the spec param ("epilogue", (inputs, exprs, outputs)), an elementwise region run on the
    value (read as ("acc",)) with its inputs read at the element's index in the kernel's
    iteration space `grid` and its outputs stored at the element. A GEMM's bias, GELU and
    residual add, a norm gradient's residual add. Bindings, in this order: the epilogue's
    inputs, the plain output (absent with an epilogue unless `keep_out`), its outputs."""

    def __init__(self, kb: KernelBuilder, p: dict, rule: ScalarRule | None, grid: tuple,
                 keep_out: bool = False):
        self.kb, self.grid = kb, tuple(grid)
        ep = p.get("epilogue")
        self.epilogue = None
        if ep is not None:
            if rule is None:
                raise TypeError("a kernel with an epilogue needs the IR's scalar_rule")
            self.epilogue = (*ep, rule)
            self.in_bufs = [kb.buffer(f"ep_in{i}", storage_dtype(dt), writable=False)
                            for i, (dt, *_) in enumerate(ep[0])]
        self.out_dtype = storage_dtype(p["out_dtype"])
        self.out = kb.buffer("out", self.out_dtype, writable=True) \
            if ep is None or keep_out else None
        if ep is not None:
            self.out_bufs = [kb.buffer(f"ep_out{i}", storage_dtype(dt), writable=True)
                             for i, (dt, _) in enumerate(ep[2])]
            self.em = ScalarEmitter(kb)
        # the host node's own dtype: a 16-bit result is rounded before the epilogue reads it
        self.acc_dtype = p.get("acc_dtype", "f32")
        self._views: dict[int, Any] = {}  # 16-byte views of the inputs (`values_run`)
        self._out_views: dict[int, Any] = {}  # ... and of the outputs (`finish_run`)

    @property
    def buffers(self) -> list[Any]:
        """The buffers `finish` stores to, in the order `values` gives their values."""
        return [self.out] if self.epilogue is None else list(self.out_bufs)

    def values(self, axes: Sequence[Value], idx: Value, v: Value) -> list[Value]:
        """What `finish` stores for the element at `axes` (linear index idx) with value v: one
        value per buffer of `buffers`, in its compute dtype (a caller storing whole fragments
        rounds and stores them itself)."""
        kb = self.kb
        if self.epilogue is None:
            return [kb.cast(v, compute_dtype(self.out_dtype))]
        inputs, exprs, outputs, rule = self.epilogue
        known = {d: kb.cast(a, "i32") for d, a in enumerate(axes)}
        ix = Indexer(kb, idx, self.grid, known)
        loaded = load_inputs(kb, ix, inputs, self.in_bufs, exprs)
        return eval_region(kb, self.em, ix, loaded, exprs, outputs, rule, "epilogue",
                           acc=round_to(kb, v, self.acc_dtype))

    def values_run(self, axes: Sequence[Value], idx: Value, vs: Sequence[Value]) -> list:
        """`values` of len(vs) elements adjacent along the grid's last axis, from the one at
        `axes` (its last index a multiple of len(vs)): each epilogue input contiguous along
        that axis (16-byte aligned rows, no window) read as 16-byte vectors, the others one
        element at a time. 8 scalar loads a lane, 16 bytes apart across the lanes, made a
        residual epilogue 18% slower than one element per lane."""
        kb = self.kb
        if self.epilogue is None:
            return [self.values(axes, idx + j, v) for j, v in enumerate(vs)]
        inputs, exprs, outputs, rule = self.epilogue
        at = [kb.cast(a, "i32") for a in axes]
        first = Indexer(kb, idx, self.grid, dict(enumerate(at)))
        runs: dict[int, list[Value]] = {}
        for i in dict.fromkeys(a[1] for *_, args in exprs for a in args if a[0] == "in"):
            dt, strides, off, *window = inputs[i]
            width = VECTOR_WIDTH.get(dt, 0)
            if window or not width or len(vs) % width or strides[-1] != 1 \
                    or any(x % width for x in (off, *strides[:-1])):
                continue
            if i not in self._views:
                self._views[i] = kb.buffer_view(self.in_bufs[i], VECTOR_VIEW[dt])
            runs[i] = load_run(kb, self._views[i], dt, first.offset(strides, off), len(vs))
        out = []
        for j, v in enumerate(vs):
            ix = Indexer(kb, idx + j, self.grid, dict(enumerate([*at[:-1], at[-1] + j])))
            loaded = load_inputs(kb, ix, inputs, self.in_bufs, exprs,
                                 {i: r[j] for i, r in runs.items()})
            out.append(eval_region(kb, self.em, ix, loaded, exprs, outputs, rule, "epilogue",
                                   acc=round_to(kb, v, self.acc_dtype)))
        return out

    def finish_run(self, axes: Sequence[Value], idx: Value, vs: Sequence[Value]) -> None:
        """`finish` of len(vs) (a multiple of 8) elements adjacent along the grid's last axis
        from the one at `axes` (linear index idx, a multiple of 8): inputs as `values_run`
        reads them, each output rounded as an element store rounds and stored as 16-byte
        vectors (every buffer bf16 or f32: the caller's to check)."""
        kb = self.kb
        outs = self.values_run(axes, idx, vs)
        for k, buf in enumerate(self.buffers):
            if k not in self._out_views:
                self._out_views[k] = kb.buffer_view(buf, VECTOR_VIEW[buf.dtype], writable=True)
            store_run(kb, self._out_views[k], buf.dtype, idx, [o[k] for o in outs])

    def finish(self, axes: Sequence[Value], idx: Value, v: Value) -> None:
        """The element at `axes` of the grid (linear index idx) is complete with value v."""
        for buf, x in zip(self.buffers, self.values(axes, idx, v), strict=True):
            buf.store(idx, x)


def _need_rule(scalar_rule: ScalarRule | None) -> ScalarRule:
    if scalar_rule is None:
        raise TypeError("elementwise generators need the IR's scalar_rule(op, emitter, attrs, "
                        "args)")
    return scalar_rule


def generate_elementwise(spec: KernelSpec, caps: object = None,
                         scalar_rule: ScalarRule | None = None) -> KernelBinary:
    """SPIR-V for one fused elementwise region (see the module docstring for the spec)."""
    rule = _need_rule(scalar_rule)
    p = dict(spec.params)
    shape = tuple(p["shape"])
    inputs, exprs, outputs = p["inputs"], p["exprs"], p["outputs"]
    n = math.prod(shape)
    grid = FlatGrid(local_size_for(caps),
                    unroll_for(n, [i[0] for i in inputs] + [o[0] for o in outputs]))
    kb = KernelBuilder(spec.name, grid.local, caps)
    kb.aliased = bool(p.get("aliased"))
    in_bufs = [kb.buffer(f"in{i}", storage_dtype(dt), writable=False)
               for i, (dt, *_) in enumerate(inputs)]
    out_bufs = [kb.buffer(f"out{k}", storage_dtype(dt), writable=True)
                for k, (dt, _) in enumerate(outputs)]
    pc = kb.push_constants([("count", "u32"), ("base", "u32")])
    lanes = grid.lanes(kb, grid.block_start(kb, pc["base"]), n, pc["count"])
    emit_unrolled_region(kb, ScalarEmitter(kb), lanes, shape, inputs, in_bufs, exprs, outputs,
                         out_bufs, rule, spec.name)
    return kb.binary(spec, grid.dispatches(n, caps),
                     notes={"elements": n, "variant": grid.variant})


def generate_elementwise_multi(spec: KernelSpec, caps: object = None,
                               scalar_rule: ScalarRule | None = None) -> KernelBinary:
    """One dispatch over several independent regions that share an expression but not shapes
    or buffers (a multi-tensor kernel: the optimizer update or a cast of every parameter).

    Spec (family "elementwise_multi"): ("bindings", ((dtype, writable), ...)) in binding order;
    ("exprs", ...) and ("outputs", ((dtype, expr_index), ...)) shared by every segment;
    ("segments", ((shape, ((binding, dtype, strides, offset[, window]), ...), (out binding,
    ...)), ...)). Segments follow one another on one `FlatGrid`, each starting at a whole
    block, so a workgroup lies in exactly one segment; it finds that segment by a balanced
    binary search over the segment starts (workgroup-uniform branches, depth log2(segments),
    not a test per segment in every thread) and runs that segment's unrolled region."""
    rule = _need_rule(scalar_rule)
    p = dict(spec.params)
    exprs, outputs = p["exprs"], p["outputs"]
    segments = [(tuple(shape), ins, outs) for shape, ins, outs in p["segments"]
                if math.prod(shape) > 0]  # an empty segment has no block to run
    sizes = [math.prod(shape) for shape, _, _ in segments]
    grid = FlatGrid(local_size_for(caps),
                    unroll_for(sum(sizes), [dt for dt, _ in p["bindings"]]))
    starts = [0]  # each segment's first element on the grid: whole blocks, padded
    for n in sizes:
        starts.append(starts[-1] + math.ceil(n / grid.block) * grid.block)
    kb = KernelBuilder(spec.name, grid.local, caps)
    kb.aliased = bool(p.get("aliased"))
    bufs = [kb.buffer(f"b{i}", storage_dtype(dt), writable=w)
            for i, (dt, w) in enumerate(p["bindings"])]
    pc = kb.push_constants([("count", "u32"), ("base", "u32")])
    em = ScalarEmitter(kb)
    start = grid.block_start(kb, pc["base"])

    def search(lo: int, hi: int) -> None:
        """Run the segment among lo..hi-1 that holds this workgroup's block."""
        if hi - lo == 1:
            shape, ins, outs = segments[lo]
            rel = start - starts[lo] if starts[lo] else start
            emit_unrolled_region(kb, em, grid.lanes(kb, rel, sizes[lo]), shape,
                                 [i[1:] for i in ins], [bufs[i[0]] for i in ins], exprs,
                                 outputs, [bufs[o] for o in outs], rule, spec.name)
            return
        mid = (lo + hi) // 2
        with kb.if_else(start < starts[mid]) as (left, right):
            with left:
                search(lo, mid)
            with right:
                search(mid, hi)

    if segments:
        search(0, len(segments))
    return kb.binary(spec, grid.dispatches(starts[-1], caps), notes={
        "elements": sum(sizes),
        "variant": f"multi-tensor x{len(p['segments'])} {grid.variant}"})


def reference_elementwise(spec: KernelSpec, arrays: Sequence[np.ndarray],
                          scalar_rule: ScalarRule) -> list[np.ndarray]:
    """numpy evaluation of the same spec (flat input buffers in, contiguous outputs out)."""
    p = dict(spec.params)
    shape = tuple(p["shape"])
    em = NumpyScalarEmitter()
    ins = []
    for (dt, strides, off), a in zip(p["inputs"], arrays, strict=True):
        flat = np.ascontiguousarray(a).reshape(-1)
        if dt == "bf16":
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        flat = flat.astype({"i32": np.int32, "bool": np.int32}.get(dt, np.float32))
        view = np.lib.stride_tricks.as_strided(
            flat[off:], shape, tuple(s * flat.itemsize for s in strides))
        ins.append(view != 0 if dt == "bool" else view)
    values: list = []

    def arg(a: tuple):
        if a[0] == "in":
            return ins[a[1]]
        if a[0] == "e":
            return values[a[1]]
        if a[0] == "const":
            return em.const(a[1], a[2])
        if a[1] < 0:  # ("iota", -1): the linear element index
            return np.arange(math.prod(shape), dtype=np.int32).reshape(shape)
        idx = np.arange(shape[a[1]], dtype=np.int32)
        return np.broadcast_to(idx.reshape([-1 if d == a[1] else 1 for d in range(len(shape))]),
                               shape)

    for op, _dt, attrs, args in p["exprs"]:
        values.append(scalar_rule(op, em, _attrs(attrs), [arg(a) for a in args]))
    outs = []
    for dt, j in p["outputs"]:
        v = np.broadcast_to(em.cast(values[j], "i32" if dt in ("i32", "bool") else "f32"), shape)
        outs.append(np.ascontiguousarray(v))
    return outs
