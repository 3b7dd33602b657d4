"""Lowering: group graph nodes into kernels and describe each as a hashable `KernelSpec`.

Elementwise nodes of one shape fuse into one kernel (any expression DAG, several outputs) as long
as the fused group creates no cycle; reductions, matmuls, gathers and scatters are one kernel
each. Layout ops become strided `View`s that the consuming kernel reads through; constants fold
into expressions. The result lists kernels in execution order and the buffers each reads and
writes, which the planner turns into a memory arena and barriers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels import reduction, scatter
from alpha_jit.codegen_spirv.views import View, padded_const
from alpha_jit.dtypes import DType, float32, int32
from alpha_jit.errors import InternalCompilerError
from alpha_jit.ir.graph import Graph, Provenance, freeze_attrs, lex_topo
from alpha_jit.ir.ops import registry
from alpha_jit.schedule import colsum, epilogue, prologue

LEAVES = ("input", "state", "hparam")
# lowering classes that become one kernel per graph node; "kernel" ops bring their own lowering
PER_NODE = ("reduction", "matmul", "gather", "scatter", "kernel")
_KERNEL_LOWERINGS: dict[str, Callable[[_Lowerer, int], None]] = {}


def register_kernel_lowering(op: str) -> Callable[[Callable[[_Lowerer, int], None]],
                                                  Callable[[_Lowerer, int], None]]:
    """Decorator: `fn(lowerer, node)` emits the kernel(s) of an op whose lowering class is
    "kernel" (an op with its own kernel family, e.g. fused attention), through the lowerer's
    `need_view`, `_contiguous`, `materialize_view` and `_emit`. Define it in a module of
    `codegen_spirv/kernels/` (all of them are imported when such an op is lowered)."""
    def deco(fn: Callable[[_Lowerer, int], None]) -> Callable[[_Lowerer, int], None]:
        _KERNEL_LOWERINGS[op] = fn
        return fn

    return deco


def kernel_lowering(op: str) -> Callable[[_Lowerer, int], None]:
    if op not in _KERNEL_LOWERINGS:
        from alpha_jit.codegen_spirv.kernels import import_all

        import_all()
    if op not in _KERNEL_LOWERINGS:
        raise InternalCompilerError("lowering", f"op {op!r} has lowering class 'kernel' but no "
                                    "registered kernel lowering (register_kernel_lowering)")
    return _KERNEL_LOWERINGS[op]


@dataclass
class Buffer:
    """A materialized value: a leaf (input/state/hparam) or something a kernel writes."""

    id: int
    kind: str  # input | state | hparam | temp
    shape: tuple
    dtype: DType
    key: object = None  # input index, state key or hparam key

    @property
    def nbytes(self) -> int:
        return max(int(math.prod(self.shape)), 1) * self.dtype.itemsize


@dataclass
class LoweredKernel:
    spec: KernelSpec
    reads: list[int]  # buffer ids, in binding order
    writes: list[int]  # buffer ids, in binding order after the reads
    nodes: list[int]  # graph nodes this kernel computes
    prov: Provenance
    fused_by: tuple[str, ...] = ()  # scheduling passes that shaped this kernel
    # (read buffer, write buffer) pairs the kernel may run in place: each element of the write
    # is stored only by the thread that alone read the same element of the read
    inplace: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Region:
    """An elementwise group as the elementwise family's spec sees it: iteration shape, input
    entries and the buffers behind them, expressions, outputs (dtype, expression) and the
    buffers they go to, and the graph nodes it computes."""

    shape: tuple
    inputs: tuple
    reads: tuple
    exprs: tuple
    outputs: tuple
    outs: tuple
    members: tuple
    name: str


@dataclass(frozen=True)
class Returned:
    """A value the step returns: the buffer holding it and the traced shape and dtype, which
    is the contract with the user (a returned view shares its base's buffer, not its shape)."""

    buffer: int
    shape: tuple
    dtype: DType


@dataclass
class Lowered:
    graph: Graph
    kernels: list[LoweredKernel] = field(default_factory=list)
    buffers: dict[int, Buffer] = field(default_factory=dict)
    outputs: list[int] = field(default_factory=list)  # buffer id per graph output
    returns: list[Returned] = field(default_factory=list)  # one per graph output, in order
    state_writes: dict[object, int] = field(default_factory=dict)  # state key -> buffer id

    def format(self) -> str:
        lines = [f"== kernels: {len(self.kernels)} =="]
        for i, k in enumerate(self.kernels):
            ins = ", ".join(f"%{b}" for b in k.reads)
            outs = ", ".join(f"%{b}" for b in k.writes)
            lines.append(f"  [{i}] {k.spec.family:<11} {k.spec.name:<28} ({ins}) -> ({outs})"
                         f"    # {k.prov.short()}  nodes={len(k.nodes)}")
        return "\n".join(lines)


def _shape_key(shape: tuple) -> int:
    return int(math.prod(shape))


class _Lowerer:
    def __init__(self, graph: Graph, max_bindings: int, caps: object = None):
        self.g = graph
        self.max_bindings = max_bindings
        self.caps = caps
        self.out = Lowered(graph)
        self.views: dict[int, View | None] = {}
        self.copy_ids = itertools.count(-1, -1)
        self.group: dict[int, int] = {}  # elementwise node -> group id
        self.absorbed: set[int] = set()  # casts the GEMMs reading them do on load
        self.members: dict[int, list[int]] = {}
        self.epilogues: dict[int, epilogue.Epilogue] = {}  # group id -> the GEMM it ends
        self.colsums: dict[int, int] = {}  # bias-gradient reduction <-> its dW GEMM, both ways
        self.done: set[int] = set()  # nodes another node's kernel already computed
        self.written: set[int] = set()  # buffers the kernels emitted so far write
        self._lowering: dict[str, str] = {}  # op -> its lowering class (asked ~10x per node)
        self._consts: dict[int, tuple | None] = {}  # node -> _const(node): the graph is fixed

    # ---- grouping -------------------------------------------------------------------------
    def _cls(self, n: int) -> str:
        op = self.g.g._node[n]["op"]
        return self._lowering.get(op) or self._lowering.setdefault(op, registry.get(op).lowering)

    def fuse(self, order: list[int]) -> None:
        """Greedy elementwise fusion in topological order.

        A group is frozen once anything outside it consumes one of its members, so the
        dependency sets used for the cycle check are final whenever they are read."""
        g = self.g
        anc: dict[int, frozenset] = {}  # non-group node -> groups it depends on
        ganc: dict[int, set] = {}  # group -> groups it depends on
        frozen: set[int] = set()
        ext: dict[int, set] = {}  # group -> external values it reads
        gid = itertools.count()

        def fits(grp: int, extra_ext: set, extra_members: int) -> bool:
            # every member might become an output: a safe bound on the kernel's bindings
            return len(ext[grp] | extra_ext) + len(self.members[grp]) + extra_members \
                <= self.max_bindings

        def dep_of(w: int) -> frozenset:
            if w in self.group:
                return frozenset(ganc[self.group[w]] | {self.group[w]})
            return anc[w]

        for n in order:
            args = g.args(n)
            if self._cls(n) == "elementwise" and n not in self.absorbed:
                cands = list(dict.fromkeys(
                    self.group[u] for u in args
                    if u in self.group and self.group[u] not in frozen
                    and g.shape(u) == g.shape(n) and g.op(n) != "pad"))
                n_ext = {w for w in args if w not in self.group and self._const(w) is None}
                chosen = next((c for c in cands if fits(c, n_ext, 1) and all(
                    self.group.get(w) == c or c not in dep_of(w) for w in args)), None)
                for d in cands:
                    # two open groups feeding n merge when neither depends on the other;
                    # an open group has no outside consumers, so nothing else refers to it
                    if chosen is None or d == chosen or d in ganc[chosen] or chosen in ganc[d] \
                            or not fits(chosen, ext[d] | n_ext, len(self.members[d]) + 1):
                        continue
                    for m in self.members.pop(d):
                        self.group[m] = chosen
                        self.members[chosen].append(m)
                    ganc[chosen] |= ganc.pop(d)
                    ext[chosen] |= ext.pop(d)
                if chosen is None:
                    chosen = next(gid)
                    self.members[chosen], ganc[chosen], ext[chosen] = [], set(), set()
                self.group[n] = chosen
                self.members[chosen].append(n)
                for w in args:
                    if self.group.get(w) != chosen:
                        ganc[chosen] |= dep_of(w)
                        if self._const(w) is None:
                            ext[chosen].add(w)
            else:
                deps: set[int] = set()
                for w in args:
                    deps |= dep_of(w)
                anc[n] = frozenset(deps)
            for w in args:  # a consumer outside w's group freezes that group
                if w in self.group and self.group[w] != self.group.get(n):
                    frozen.add(self.group[w])

    # ---- views ----------------------------------------------------------------------------
    def view(self, n: int) -> View | None:
        """The strided view through which a kernel reads node n (None: not in memory)."""
        if n in self.views:
            return self.views[n]
        g = self.g
        v: View | None
        if n in self.out.buffers:
            v = View.of(n, g.shape(n))
        elif self._cls(n) == "view":
            src = self.view(g.args(n)[0])
            v = None if src is None else self._apply_view(n, src)
        else:
            v = None
        self.views[n] = v
        return v

    def _apply_view(self, n: int, src: View, dtype: DType | None = None) -> View:
        """View op n applied to its source's view (copying when no strided form exists; the
        copy is of `dtype`, default n's: an absorbed cast's views still hold f32 data)."""
        g = self.g
        op, attrs = g.op(n), g.attrs(n)
        if op == "transpose":
            return src.transpose(attrs["perm"])
        if op == "broadcast_to":
            return src.broadcast_to(attrs["shape"])
        if op == "slice":
            return src.slice(attrs["starts"], attrs["stops"])
        v = src.reshape(attrs["shape"])
        if v is None:  # no strided form: copy the source to contiguous memory first
            v = self.materialize_view(src, dtype or g.dtype(n), n).reshape(attrs["shape"])
        if v is None:
            raise InternalCompilerError("lowering", f"reshape of %{n} to {attrs['shape']} has "
                                        "no strided form after a copy", g.prov(n).where())
        return v

    def need_view(self, n: int, for_node: int) -> View:
        """A view of n, materializing constants (and views of them) if needed."""
        v = self.view(n)
        if v is not None:
            return v
        g = self.g
        if self._cls(n) == "view":  # a view of a value not in memory: materialize the source
            v = self._apply_view(n, self.need_view(g.args(n)[0], for_node))
            self.views[n] = v
            return v
        if g.op(n) == "full":
            arg = self._const(n)
        elif g.op(n) == "iota":
            arg = ("iota", g.attrs(n)["axis"])
        else:
            raise InternalCompilerError("lowering", f"%{n} = {g.op(n)} {g.dtype(n)}"
                                        f"{list(g.shape(n))} has no buffer and is not a "
                                        "constant", g.prov(n).where())
        buf = next(self.copy_ids)
        self.out.buffers[buf] = Buffer(buf, "temp", g.shape(n), g.dtype(n))
        exprs = (("copy", g.dtype(n).name, (), (arg,)),)
        self._emit("elementwise", f"fill_{g.op(n)}", (
            ("shape", g.shape(n)), ("inputs", ()), ("exprs", exprs),
            ("outputs", ((g.dtype(n).name, 0),))), [], [buf], [n], for_node)
        return View.of(buf, g.shape(n))

    def materialize_view(self, src: View, dtype: DType, for_node: int,
                         cast_to: DType | None = None) -> View:
        """A contiguous copy of `src` (data of `dtype`), converted to `cast_to` if given."""
        out = cast_to or dtype
        buf = next(self.copy_ids)
        self.out.buffers[buf] = Buffer(buf, "temp", src.shape, out)
        expr = ("cast", out.name, (("dtype", out.name),), (("in", 0),)) if cast_to else \
            ("copy", out.name, (), (("in", 0),))
        spec = (("shape", src.shape), ("inputs", ((dtype.name, src.strides, src.offset),)),
                ("exprs", (expr,)), ("outputs", ((out.name, 0),)))
        self._emit("elementwise", "cast_view" if cast_to else "copy_view", spec, [src.base],
                   [buf], [], for_node)
        return View.of(buf, src.shape)

    # ---- kernels --------------------------------------------------------------------------
    def _emit(self, family: str, name: str, params: tuple, reads: list[int], writes: list[int],
              nodes: list[int], prov_node: int, fused_by: tuple[str, ...] = (),
              inplace: tuple[tuple[int, int], ...] = ()) -> None:
        self.out.kernels.append(LoweredKernel(KernelSpec(family, name, params), reads, writes,
                                              nodes, self.g.prov(prov_node), fused_by, inplace))
        self.written.update(writes)

    def inplace_pairs(self, shape: tuple, entries: list[tuple[int, tuple | None, int]],
                      outs: list[tuple[int, set[int]]]) -> tuple[tuple[int, int], ...]:
        """(read, write) buffer pairs safe to share memory in a one-thread-per-element kernel
        over `shape`: the read is a whole temporary (or a state, paired with the value written
        back to it) read once, contiguously from offset 0, with the write's element size, and
        the written value depends on it (so no compiler can store it before the load).
        entries: (buffer, strides or None if it can never pair, offset) per input; outs:
        (buffer, indices of the entries its value depends on)."""
        seen: dict[int, int] = {}
        for b, *_ in entries:
            seen[b] = seen.get(b, 0) + 1
        numel = _shape_key(shape)
        contiguous = tuple(View.of(0, shape).strides)
        free = list(outs)
        pairs = []
        # a state read pairs only with the value written back to that state (the optimizer
        # updating a parameter or a moment in place: the plan decides), and first
        writes = self.g.state_writes
        order = sorted(range(len(entries)),
                       key=lambda i: self.out.buffers[entries[i][0]].kind != "state")
        for i in order:
            b, strides, off = entries[i]
            buf = self.out.buffers[b]
            if strides is None or seen[b] != 1 or buf.kind not in ("temp", "state") \
                    or off != 0 or _shape_key(buf.shape) != numel \
                    or tuple(strides) != contiguous:
                continue
            size = buf.dtype.itemsize
            match = next((o for o in free if i in o[1]
                          and self.out.buffers[o[0]].dtype.itemsize == size
                          and (buf.kind == "temp" or writes.get(buf.key) == o[0])), None)
            if match is not None:
                free.remove(match)
                pairs.append((b, match[0]))
        return tuple(pairs)

    def add_temp(self, n: int) -> None:
        """Give node n a buffer of its own (a kernel writes it)."""
        self.out.buffers[n] = Buffer(n, "temp", self.g.shape(n), self.g.dtype(n))

    def _const(self, u: int) -> tuple | None:
        """("const", value, dtype) when u is a constant, or any view of one (a reshaped or
        broadcast constant is the same constant everywhere); None otherwise."""
        if u not in self._consts:
            g, v = self.g, u
            while self._cls(v) == "view":
                v = g.args(v)[0]
            full = g.op(v) == "full"
            self._consts[u] = ("const", g.attrs(v)["value"], g.dtype(v).name) if full else None
        return self._consts[u]

    def region(self, gid: int, acc: frozenset = frozenset()) -> Region:
        """Group gid as an elementwise region over its shape; members read the nodes in `acc`
        as ("acc",) (a GEMM epilogue's accumulator)."""
        g = self.g
        members = sorted(self.members[gid], key=self.position.__getitem__)
        mset = set(members)
        shape = g.shape(members[0])
        inputs: list[tuple] = []
        reads: list[int] = []
        in_index: dict[tuple, int] = {}
        expr_of: dict[int, int] = {}
        exprs: list[tuple] = []
        for n in members:
            args = []
            for u in g.args(n):
                if u in mset:
                    args.append(("e", expr_of[u]))
                elif u in acc:
                    args.append(("acc",))
                elif self._const(u) is not None and g.op(n) == "pad":
                    args.append(padded_const(g.shape(n), g.attrs(n)["pads"], self._const(u), exprs))
                elif self._const(u) is not None:
                    args.append(self._const(u))
                else:
                    entry, base = self._input_entry(u, n, shape)
                    if (base, entry) not in in_index:  # one binding per distinct read
                        in_index[(base, entry)] = len(inputs)
                        inputs.append(entry)
                        reads.append(base)
                    args.append(("in", in_index[(base, entry)]))
            op = g.op(n)
            if op == "iota":
                op, args = "copy", [("iota", g.attrs(n)["axis"])]
            expr_of[n] = len(exprs)
            exprs.append((op, g.dtype(n).name, freeze_attrs(g.attrs(n)), tuple(args)))
        outs = [n for n in members if n in self.out.buffers]
        outputs = tuple((g.dtype(n).name, expr_of[n]) for n in outs)
        name = "_".join(dict.fromkeys(g.op(n) for n in members))[:40]
        return Region(shape, tuple(inputs), tuple(reads), tuple(exprs), outputs, tuple(outs),
                      tuple(members), name)

    def elementwise(self, gid: int) -> None:
        r = self.region(gid)
        params = (("shape", r.shape), ("inputs", r.inputs), ("exprs", r.exprs),
                  ("outputs", r.outputs))
        entries = [(b, e[1] if len(e) == 3 else None, e[2])  # a windowed read never pairs
                   for b, e in zip(r.reads, r.inputs, strict=True)]
        deps: list[set[int]] = []  # per expression: the inputs it reads, transitively
        for _op, _dt, _attrs, args in r.exprs:
            d: set[int] = set()
            for a in args:
                if a[0] == "in":
                    d.add(a[1])
                elif a[0] == "e":
                    d |= deps[a[1]]
            deps.append(d)
        outs = [(o, deps[j]) for o, (_, j) in zip(r.outs, r.outputs, strict=True)]
        pairs = self.inplace_pairs(r.shape, entries, outs)
        if pairs:
            params += (("aliased", True),)
        self._emit("elementwise", r.name, params, list(r.reads), list(r.outs), list(r.members),
                   r.members[-1], inplace=pairs)

    def _input_entry(self, u: int, n: int, shape: tuple) -> tuple[tuple, int]:
        """How group member n reads external value u: (dtype, strides, offset[, window])."""
        g = self.g
        v = self.need_view(u, n)
        if g.op(n) != "pad":
            v = v.broadcast_to(shape)
            return (g.dtype(u).name, v.strides, v.offset), v.base
        # out[i] = in[i - before] inside the window [before, before + size) on each axis
        pads = g.attrs(n)["pads"]
        off = v.offset - sum(b * st for (b, _), st in zip(pads, v.strides, strict=True))
        window = tuple((b, b + s) for (b, _), s in zip(pads, v.shape, strict=True))
        return (g.dtype(u).name, v.strides, off, window), v.base

    def single(self, n: int) -> None:
        g = self.g
        op, attrs, cls = g.op(n), g.attrs(n), self._cls(n)
        args = g.args(n)
        if n in self.done:
            return  # another node's kernel computed it
        if cls == "reduction":
            if colsum.emit_early(self, n):
                return
            params, reads = self.reduction_params(n)
            writes = [n]
            chunks = reduction.strip_chunks(params, self.caps)
            if chunks is not None:  # a strided sum as column strips (a bias gradient)
                params += (("strips", chunks),)
                if chunks > 1:  # the chunks' partial sums: a temporary of this kernel
                    writes.append(next(self.copy_ids))
                    self.out.buffers[writes[-1]] = Buffer(
                        writes[-1], "temp", (chunks, math.prod(self.g.shape(n))), float32)
            self._emit("reduction", f"{op}_{dict(params)['red_len']}", params, reads, writes,
                       [n], n)
        elif cls == "matmul":
            params, reads = self.matmul_params(n)
            colsum.emit_matmul(self, n, params, reads)
        elif cls in ("gather", "scatter"):
            src, ids = (self._contiguous(a, n) for a in args)
            if cls == "gather":
                rows, dim = g.shape(args[0])
                params = (("rows", rows), ("dim", dim), ("n", ids.numel),
                          ("dtype", g.dtype(n).name), ("table_offset", src.offset),
                          ("ids_offset", ids.offset))
            else:
                rows, dim = attrs["rows"], g.shape(args[0])[1]
                params = (("rows", rows), ("dim", dim), ("n", ids.numel),
                          ("dtype", g.dtype(n).name), ("src_offset", src.offset),
                          ("ids_offset", ids.offset), *scatter.choose(rows, dim, ids.numel,
                                                                      self.caps))
            writes = [n]
            if cls == "scatter" and scatter.workspace_words(params):  # its sorted chunks
                writes.append(next(self.copy_ids))
                self.out.buffers[writes[-1]] = Buffer(
                    writes[-1], "temp", (scatter.workspace_words(params),), int32)
            self._emit(cls, f"{op}_{rows}x{dim}", params, [src.base, ids.base], writes, [n], n)
        elif cls == "kernel":
            kernel_lowering(op)(self, n)
        else:
            raise InternalCompilerError("lowering", f"no lowering for %{n} = {op} ({cls})",
                                        g.prov(n).where())

    def reduction_params(self, n: int) -> tuple[tuple, list[int]]:
        """The reduction spec's params for node n and the buffer it reads."""
        g = self.g
        a = g.args(n)[0]
        v, dt, _ = self._operand(a, n)
        ax = g.attrs(n)["axis"]
        outer = tuple(s for i, s in enumerate(v.shape) if i != ax)
        ostr = tuple(s for i, s in enumerate(v.strides) if i != ax)
        mode = {"sum": "sum", "mean": "mean", "max": "max", "logsumexp": "lse"}[g.op(n)]
        return (("mode", mode), ("outer_shape", outer), ("outer_strides", ostr),
                ("offset", v.offset), ("red_len", v.shape[ax]), ("red_stride", v.strides[ax]),
                ("in_dtype", dt.name), ("out_dtype", g.dtype(n).name)), [v.base]

    def matmul_params(self, n: int) -> tuple[tuple, list[int]]:
        """The matmul spec's params for node n and the buffers its operands read."""
        g = self.g
        out_shape = g.shape(n)
        batch = out_shape[:-2]
        m, nn = out_shape[-2], out_shape[-1]
        ops = []
        for a in g.args(n)[:2]:
            v, dt, rnd = self._operand(a, n)
            v = v.broadcast_to((*batch, *v.shape[-2:]))
            cb = v.collapse_batch()
            if cb is None:
                v = self.materialize_view(v, dt, n)
                cb = v.collapse_batch()
            ops.append((v, cb, dt, rnd))
        (va, (nb, sba), a_dt, a_rnd), (vb, (_, sbb), b_dt, b_rnd) = ops
        k = va.shape[-1]
        params = (("batch", nb), ("m", m), ("n", nn), ("k", k),
                  ("a", (a_dt.name, va.offset, sba, va.strides[-2], va.strides[-1])),
                  ("b", (b_dt.name, vb.offset, sbb, vb.strides[-2], vb.strides[-1])),
                  ("out_dtype", g.dtype(n).name))
        params += tuple((f"{x}_round", r) for x, r in (("a", a_rnd), ("b", b_rnd)) if r)
        return params, [va.base, vb.base]

    def _operand(self, a: int, n: int) -> tuple[View, DType, str | None]:
        """How matmul n reads operand a: (view, dtype of the data, rounding on load). An
        absorbed cast is read as its f32 source through the same views, rounded to bf16."""
        g = self.g
        chain = []
        u = a
        while self._cls(u) == "view":
            chain.append(u)
            u = g.args(u)[0]
        if u not in self.absorbed:
            return self.need_view(a, n), g.dtype(a), None
        src = g.args(u)[0]
        narrowing = g.dtype(u).itemsize < g.dtype(src).itemsize
        v, dt, rnd = self.need_view(src, n), g.dtype(src), g.dtype(u).name if narrowing else None
        for w in reversed(chain):
            if rnd and g.op(w) == "reshape" and v.reshape(g.attrs(w)["shape"]) is None:
                # a copy is needed anyway: let it do the cast (half the bytes of an f32 copy)
                v, dt, rnd = self.materialize_view(v, dt, n, cast_to=g.dtype(u)), g.dtype(u), None
            v = self._apply_view(w, v, dt)
        return v, dt, rnd

    def _contiguous(self, a: int, n: int) -> View:
        v = self.need_view(a, n)
        return v if v.is_contiguous() else self.materialize_view(v, self.g.dtype(a), n)

    # ---- driver ---------------------------------------------------------------------------
    def run(self) -> Lowered:
        g = self.g
        order = g.topo()
        self.position = {n: i for i, n in enumerate(order)}
        self.absorbed = prologue.absorbed_casts(self, order)
        self.fuse(order)
        if epilogue.enabled():
            self.epilogues = epilogue.find(self, order)
        in_epilogue = {u: ep.group for ep in self.epilogues.values() for u in ep.chain}
        if colsum.enabled():
            self.colsums = colsum.pairs(self, order, set(in_epilogue))
        roots = set(g.roots())
        for n in order:
            cls = self._cls(n)
            if cls == "input":
                kind = g.op(n)
                key = {"input": "index", "state": "key", "hparam": "key"}[kind]
                self.out.buffers[n] = Buffer(n, kind, g.shape(n), g.dtype(n), g.attrs(n)[key])
            elif cls in PER_NODE and n not in in_epilogue:
                self.add_temp(n)
            elif cls == "elementwise" and n not in self.absorbed:
                grp = self.group[n]
                if n in roots or any(self.group.get(v) != grp for v in g.users(n)):
                    self.out.buffers[n] = Buffer(n, "temp", g.shape(n), g.dtype(n))
        # units: one per elementwise group or kernel node, ordered by the unit-level DAG
        unit: dict[int, tuple] = {}
        for n in order:
            cls = self._cls(n)
            if n in in_epilogue:  # the GEMM and the reshapes of its result join the group
                unit[n] = ("g", in_epilogue[n])
            elif cls == "elementwise" and n not in self.absorbed:
                unit[n] = ("g", self.group[n])
            elif cls in PER_NODE:
                unit[n] = ("k", n)
            else:
                unit[n] = ("n", n)
        first: dict[tuple, int] = {}
        for i, n in enumerate(order):
            first.setdefault(unit[n], i)  # units run in the order of their first node
        q: dict[tuple, dict] = {un: {} for un in first}  # unit -> {unit reading it: one edge}
        for u, v in g.g.edges():
            if unit[u] != unit[v]:
                q[unit[u]][unit[v]] = (v,)
        for un in lex_topo(q, key=first.__getitem__):
            if un[0] == "g":
                ep = self.epilogues.get(un[1])
                if ep is None or not epilogue.emit(self, ep):
                    self.elementwise(un[1])
            elif un[0] == "k":
                self.single(un[1])
        written = {k for k, n in g.state_writes.items()
                   if not (g.op(n) == "state" and g.attrs(n)["key"] == k)}
        for o in g.outputs:
            # a state's value as it was, returned though the step writes the state: copied
            # by a kernel (the readback comes after the write-back, or the update is in place)
            base = self.out.buffers[self.need_view(o, o).base]
            buf = self._root_buffer(o, temp_only=base.kind == "state" and base.key in written)
            self.out.outputs.append(buf)
            self.out.returns.append(Returned(buf, g.shape(o), g.dtype(o)))
        for key, n in g.state_writes.items():
            if key in written:  # else written back unchanged
                self.out.state_writes[key] = self._root_buffer(n, temp_only=True)
        return self.out

    def _root_buffer(self, n: int, temp_only: bool = False) -> int:
        """A contiguous buffer holding root n (copying views and constants if needed).
        State writes always come from a temporary, so end-of-step copies never read a
        buffer that another end-of-step copy overwrites."""
        v = self.need_view(n, n)
        base = self.out.buffers[v.base]
        if v.is_contiguous() and v.offset == 0 and v.numel == _shape_key(base.shape) and (
                base.kind == "temp" or not temp_only):
            return v.base
        return self.materialize_view(v, self.g.dtype(n), n).base


def lower(graph: Graph, max_bindings: int = 32, caps: object = None) -> Lowered:
    """Kernels (in execution order) and buffers for a graph that passes have run on.
    `max_bindings`: the device's storage buffers per stage; fused groups stay within it.
    `caps`: the device's capabilities, where a kernel's layout depends on its variant."""
    return _Lowerer(graph, max_bindings, caps).run()
