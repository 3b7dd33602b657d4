"""Cast folding: a low-precision cast is computed by the kernel that produces its input.

Why: under bf16/f16 autocast every GEMM and attention operand is cast from the f32 value that
produced it: the LayerNorm output, the GELU output, the attention output (after its head
transpose). Each cast was a kernel of its own reading the f32 tensor back, and the f32 tensor
itself stayed alive. These rewrites remove them:

1. A cast of views (reshape, transpose) of an elementwise value becomes the same views of the
   cast, so lowering fuses the cast into the group (or GEMM epilogue) that computes the value:
   `gelu(x @ w + b)` writes its bf16 copy in the GEMM's store, and so do the q/k/v projections
   (attention reads them through the head transpose's strides). Likewise for an input or a
   state: `cast(W.T)` becomes `cast(W).T`, so the cast kernel reads the weight in its own
   layout (coalesced) and the GEMMs read the bf16 copy through the transpose's strides.
2. A cast whose input (through views) is the only use of a LayerNorm / RMSNorm result, or an
   attention result read otherwise only by attention's backward, makes that op produce the
   cast's dtype (its `out_dtype`): the norm or flash kernel stores bf16 directly. Attention's
   backward then reads the bf16 output, as PyTorch's flash attention does.
3. A backward sum of an f32 gradient that is otherwise only read as the precision policy's
   16-bit cast for GEMMs (a Linear's output gradient: its dX and dW GEMMs read the bf16 copy,
   the bias gradient sums it) sums that copy instead, widened exactly to f32 (the reduction
   reads the 16-bit data): PyTorch's autocast computes the bias gradient from the bf16
   grad_output too. Sums and casts the user wrote are left alone. The f32 gradient then has
   no reader but the cast, so its producer stores the bf16 copy only (schedule/prologue):
   half the bytes written, and GEMMs read 16-bit operands instead of rounding f32 ones on
   load (28-30% of an H200 dX GEMM's time in `gpt2`).

Values are unchanged by rewrite 1 and by rewrite 2 for norms (a cast of the f32 result is what
the kernel stores); rewrite 3 rounds what the bias gradient sums, as PyTorch does. The
reference interpreter runs the rewritten graph, so every result stays checkable. Before
these, a round trip low -> f32 -> low is dropped (exact).
`ALPHA_JIT_DISABLE_PASSES=cast_fold` switches it off.
"""

from __future__ import annotations

from alpha_jit import dtypes
from alpha_jit.ir.graph import Graph
from alpha_jit.ir.ops import registry
from alpha_jit.ir.passes.manager import register_pass
from alpha_jit.ir.trace import AUTOCAST

_VIEWS = ("reshape", "transpose")
_PRODUCERS = ("layer_norm", "rms_norm", "attention")
_ATTENTION_READERS = ("attention_bwd_dq", "attention_bwd_dk", "attention_bwd_dv")
_LOW = ("bf16", "f16")
# what a cast sinks below views into: an elementwise group fuses it; a cast of an input or
# state (a weight) then reads it in its own layout (the transposed read of a weight ran at
# 0.64 TB/s on the H200, a coalesced one streams)
_SINK_INTO = ("elementwise", "input")


def _chain(g: Graph, c: int, ops: tuple[str, ...]) -> tuple[list[int], int]:
    """The views (of `ops`) between cast c and the value it reads, innermost last, and that
    value."""
    chain = []
    u = g.args(c)[0]
    while g.op(u) in ops:
        chain.append(u)
        u = g.args(u)[0]
    return chain, u


def _sink(g: Graph, c: int) -> int | None:
    """Rewrite 1: cast(views(x)) -> views(cast(x)) for an elementwise x (the same views);
    returns the top of the new views (None: no rewrite)."""
    chain, x = _chain(g, c, _VIEWS)
    if not chain or registry.get(g.op(x)).lowering not in _SINK_INTO:
        return None
    # a cast of the precision policy stays one when moved (rewrite 3 reads only those)
    made = g.prov(c).created_by
    prov = g.prov(c).with_(created_by=made if made == AUTOCAST else "cast_fold")
    out = g.add("cast", [x], dict(g.attrs(c)), g.shape(x), g.dtype(c), prov, in_place_of=c)
    for v in reversed(chain):
        out = g.add(g.op(v), [out], dict(g.attrs(v)), g.shape(v), g.dtype(c), prov,
                    in_place_of=c)
    g.replace_uses(c, out)
    g.remove(c)
    return out


def _into_producer(g: Graph, c: int, roots: set[int]) -> bool:
    """Rewrite 2: the producer stores the cast's dtype; the views carry it."""
    chain, n = _chain(g, c, _VIEWS)
    if g.op(n) not in _PRODUCERS or g.dtype(n) != dtypes.float32 or n in roots:
        return False
    if any(len(g.users(v)) != 1 or v in roots for v in chain):
        return False
    others = [u for u in g.users(n) if u != (chain[-1] if chain else c)]
    allowed = _ATTENTION_READERS if g.op(n) == "attention" else ()
    if any(g.op(u) not in allowed for u in others):
        return False
    low = g.dtype(c)
    g.node(n)["dtype"] = low
    g.node(n)["attrs"] = {**g.attrs(n), "out_dtype": low.name}
    for v in chain:
        g.node(v)["dtype"] = low
    g.replace_uses(c, chain[0] if chain else n)
    g.remove(c)
    return True


def _cast_below(g: Graph, top: int) -> int:
    """The cast at the bottom of the views that `_sink` just stacked on it."""
    while g.op(top) != "cast":
        top = g.args(top)[0]
    return top


def _round_trip(g: Graph, c: int) -> bool:
    """Rewrite 0: cast(cast(x: low -> f32) -> low) is x (widening is exact). The backward of
    a bf16 activation casts its gradient to f32 for the op before, and the next GEMM casts
    it back."""
    inner = g.args(c)[0]
    if g.op(inner) != "cast" or g.dtype(inner) != dtypes.float32:
        return False
    x = g.args(inner)[0]
    if g.dtype(x) != g.dtype(c):
        return False
    g.replace_uses(c, x)
    g.remove(c)
    return True


def _gemm_operand(g: Graph, u: int) -> bool:
    """Whether u is read only by matmuls (through views)."""
    return bool(g.users(u)) and all(
        g.op(v) == "matmul" or (g.op(v) in _VIEWS and _gemm_operand(g, v)) for v in g.users(u))


def _sum_reads_cast(g: Graph, r: int, roots: set[int]) -> bool:
    """Rewrite 3: sum(views(x)) -> sum(views(f32(c))) for an f32 gradient x (backward,
    elementwise) whose every other reader is an autocast cast c of it to one 16-bit dtype that
    only GEMMs read (see the module). A sum the user wrote, or of a value a cast of the user's
    reads, keeps its f32 input."""
    if g.dtype(r) != dtypes.float32 or g.prov(r).phase != "bwd":
        return False
    chain, x = _chain(g, r, _VIEWS)
    if g.dtype(x) != dtypes.float32 or x in roots or any(v in roots for v in chain) \
            or registry.get(g.op(x)).lowering != "elementwise" or g.prov(x).phase != "bwd":
        return False
    inside = {*chain, r}
    readers = [u for u in g.users(x) if u not in inside]
    casts = [u for u in readers if g.op(u) == "cast" and g.dtype(u).name in _LOW
             and g.prov(u).created_by == AUTOCAST and _gemm_operand(g, u)]
    if not casts or len(casts) != len(readers) or len({g.dtype(c) for c in casts}) != 1:
        return False
    if any(len(g.users(v)) != 1 for v in chain):
        return False  # a view shared with another reader keeps reading x
    c = casts[0]
    prov = g.prov(r).with_(created_by="cast_fold")
    # ordered where the sum is (not after everything else)
    top = g.add("cast", [c], {"dtype": dtypes.float32}, g.shape(c), dtypes.float32, prov,
                in_place_of=r)
    for v in reversed(chain):
        top = g.add(g.op(v), [top], dict(g.attrs(v)), g.shape(v), dtypes.float32, prov,
                    in_place_of=r)
    g.rewire(r, g.op(r), [top], dict(g.attrs(r)))
    for v in chain:  # the old views, now unread
        g.remove(v)
    return True


@register_pass("cast_fold", "compute low-precision casts in the kernel producing their input")
def cast_fold(graph: Graph) -> tuple[Graph, str]:
    g = graph.copy()
    roots = set(g.roots())
    trips = sunk = folded = 0
    work = g.topo()
    while work:  # a cast moved before views may now close a round trip: look again
        moved = []
        for c in work:
            if c not in g.g or g.op(c) != "cast" or c in roots or g.dtype(c).name not in _LOW:
                continue
            if _round_trip(g, c):
                trips += 1
            elif _into_producer(g, c, roots):
                folded += 1
            elif (top := _sink(g, c)) is not None:
                sunk += 1
                moved.append(top)  # the newest node: what max(g.g.nodes) found, in O(1)
        work = [_cast_below(g, v) for v in moved]
    summed = sum(_sum_reads_cast(g, r, roots) for r in g.nodes_with_op("sum"))
    return g, (f"{trips} round trips through f32 removed, {folded} casts computed by their "
               f"producer (norm, attention), {sunk} moved before views to fuse with their "
               f"input, {summed} sums reading the 16-bit copy")
