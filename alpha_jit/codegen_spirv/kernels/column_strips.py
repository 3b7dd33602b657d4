"""Column-strip reductions: sums (or maxima) down the rows of a matrix whose columns sit side by
side in memory.

Why: a Linear's bias gradient sums dY [8192, N] over its rows, and a norm's dw/db sums
g * xhat the same way. A workgroup per column walks memory at the row stride (308 GB/s on the
H200 for `gpt2`'s bias sums); a thread per column leaves most of a GPU idle. Here a workgroup
owns a strip of `lx` adjacent columns (neighbouring lanes read neighbouring columns: whole
memory sectors) and `ly` row lanes; each thread keeps `unroll` rows' loads in flight; and the
rows are split in `chunks` over the workgroups' y axis, so a few hundred columns still fill
the device. The row lanes fold through shared memory and the chunks in a second dispatch,
both in a fixed order: the same bits every run (no atomics).

Used by norm_dwb (`rowwise.py`) and the reduction family's sums over a strided axis
(`reduction.py`). With chunks > 1 the kernel takes a workspace binding (f32
[chunks, outputs, columns], a plan temporary) and a push constant `phase`: dispatch 0 writes
each chunk's sums there, dispatch 1 folds them in chunk order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..dsl import Buffer, KernelBuilder, Value, cap, max_groups_x, pack_push_constants
from ..kernel import Dispatch
from ..scalar import nan_minmax
from .elementwise import local_size_for

_FILL = 1024  # workgroups that keep a big GPU's memory system busy (8 of 256 lanes per SM)
_MIN_ROWS = 128  # rows per chunk below which the second dispatch costs more than it saves
_MAX_CHUNKS = 64
_GPU_UNROLL = 4  # rows per thread in flight on a GPU (a CPU device gains nothing from it)
OPS = ("add", "max")
_IDENTITY = {"add": 0.0, "max": float("-inf")}


@dataclass(frozen=True)
class StripLayout:
    """How a column reduction is spread: `lx` columns x `ly` row lanes per workgroup, the rows
    cut in `chunks` (workgroups along y), `unroll` rows per thread per trip."""

    lx: int
    ly: int
    chunks: int
    unroll: int

    def span(self, rows: int) -> int:
        """Rows per chunk (the last one may be shorter, never empty)."""
        return math.ceil(rows / self.chunks)

    def workspace_words(self, outputs: int, cols: int) -> int:
        """f32 words of the chunks' partial sums (0: one pass, no workspace)."""
        return self.chunks * outputs * cols if self.chunks > 1 else 0

    def variant(self) -> str:
        rows = f" x{self.chunks} row chunks" if self.chunks > 1 else ""
        unroll = f", {self.unroll} rows in flight" if self.unroll > 1 else ""
        return f"column strips {self.lx}x{self.ly}{rows}{unroll}"


def _whole_chunks(rows: int, chunks: int) -> int:
    """Chunks of ceil(rows / chunks) rows that cover `rows` with none left empty."""
    chunks = max(1, min(chunks, rows))
    return math.ceil(rows / math.ceil(rows / chunks))


def strip_layout(rows: int, cols: int, caps: object, chunks: int | None = None,
                 unroll: int | None = None) -> StripLayout:
    """The layout for `rows` x `cols` on the device of `caps`: one pass on a CPU device,
    else enough row chunks to fill the GPU (`chunks`/`unroll` given: a spec's own choice)."""
    total = local_size_for(caps)
    lx = min(32, 1 << max(0, cols - 1).bit_length(), total)
    ly = max(1, total // lx)
    cpu = cap(caps, "device_type", None) == "cpu"
    if chunks is None:
        strips = math.ceil(cols / lx)
        chunks = 1 if cpu else min(math.ceil(_FILL / strips), rows // _MIN_ROWS, _MAX_CHUNKS)
    if unroll is None:
        unroll = 1 if cpu else _GPU_UNROLL
    return StripLayout(lx, ly, _whole_chunks(rows, chunks), max(1, unroll))


def combine(kb: KernelBuilder, op: str, a: Value, b: Value) -> Value:
    """a + b, or the NaN-propagating max (a NaN row keeps its column NaN)."""
    return a + b if op == "add" else nan_minmax(kb, "max", a, b)


def emit_column_sums(kb: KernelBuilder, lay: StripLayout, rows: int, cols: int,
                     ops: Sequence[str], load: Callable[[Value, Value], list[Value]],
                     store: Callable[[int, Value, Value], None],
                     workspace: Buffer | None = None,
                     column_base: Callable[[Value], Value] | None = None) -> list[Dispatch]:
    """Emit the reduction into `kb` (built with local size (lx, ly, 1); every buffer already
    declared, then `workspace` (a storage buffer) when lay.chunks > 1) and return its
    dispatches. load(row, base) gives one f32 per op for an in-range row of the thread's
    column, where base = column_base(col) (default: col), computed once before any loop;
    store(k, col, total) writes output k's column total."""
    if lay.chunks > 1 and workspace is None:
        raise ValueError(f"{kb.name}: {lay.chunks} row chunks need a workspace binding")
    groups = math.ceil(cols / lay.lx)
    if groups > max_groups_x(kb.caps):
        raise ValueError(f"{kb.name}: {cols} columns need {groups} workgroups, over the "
                         f"device's {max_groups_x(kb.caps)}")
    n_out, lx, ly = len(ops), lay.lx, lay.ly
    tx, ty = kb.cast(kb.local_id(0), "i32"), kb.cast(kb.local_id(1), "i32")
    col = kb.cast(kb.workgroup_id(0), "i32") * lx + tx
    base = column_base(col) if column_base is not None else col
    part = kb.shared("f32", lx * ly * n_out)

    def strip(out: Callable[[int, Value], None]) -> None:
        """This workgroup's rows of its columns, folded over the row lanes in fixed order."""
        span, block = lay.span(rows), ly * lay.unroll
        acc = [kb.var("f32", _IDENTITY[op]) for op in ops]

        def add(vals: list[Value]) -> None:
            for k, op in enumerate(ops):
                acc[k].set(combine(kb, op, acc[k].get(), vals[k]))

        if lay.chunks > 1:
            lo = kb.cast(kb.workgroup_id(1), "i32") * span
            hi = kb.fmin(lo + span, rows)
        else:
            lo, hi = kb.i32(0), kb.i32(rows)
        with kb.if_(col < cols):
            full = (hi - lo) / block  # whole blocks: every row of the trip exists
            with kb.loop(0, full, 1, max_trips=max(1, span // block)) as b:
                first = lo + b * block + ty
                # every load of the trip first, then the adds (in row order: deterministic)
                vals = [load(first + u * ly if u else first, base) for u in range(lay.unroll)]
                for v in vals:
                    add(v)
            with kb.loop(lo + full * block + ty, hi, ly, max_trips=lay.unroll) as i:
                add(load(i, base))
        for k in range(n_out):
            part.store((k * ly + ty) * lx + tx, acc[k].get())
        kb.barrier()
        with kb.if_((ty == 0) & (col < cols)):
            for k, op in enumerate(ops):
                tot = part.load(k * ly * lx + tx)
                for lane in range(1, ly):  # fixed order: the same bits every run
                    tot = combine(kb, op, tot, part.load((k * ly + lane) * lx + tx))
                out(k, tot)

    if lay.chunks == 1:
        strip(lambda k, tot: store(k, col, tot))
        return [Dispatch((groups, 1, 1))]
    phase = kb.push_constants([("phase", "u32")])["phase"]
    with kb.if_else(phase == 0) as (first_pass, second_pass):
        with first_pass:
            chunk = kb.cast(kb.workgroup_id(1), "i32")
            strip(lambda k, tot: workspace.store((chunk * n_out + k) * cols + col, tot))
        with second_pass, kb.if_((ty == 0) & (col < cols)):
            for k, op in enumerate(ops):
                tot = workspace.load(k * cols + col)
                for c in range(1, lay.chunks):  # chunk order: deterministic
                    tot = combine(kb, op, tot, workspace.load((c * n_out + k) * cols + col))
                store(k, col, tot)
    return [Dispatch((groups, lay.chunks, 1), pack_push_constants([("u32", 0)])),
            Dispatch((groups, 1, 1), pack_push_constants([("u32", 1)]))]
