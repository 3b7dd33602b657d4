"""Reverse-mode autodiff on the graph, using each op's VJP rule.

`loss.backward()` inside a trace calls `backward`: it walks the nodes between the trainable state
(parameters) and the loss in reverse topological order, asks each op's VJP for the cotangents of
its arguments (recorded as ordinary nodes in phase "bwd", carrying the forward node's file:line
and module path) and sums them per node. The results become `p.grad` inside the trace, so fusion
passes see forward, backward and optimizer nodes as one graph.
"""

from __future__ import annotations

from alpha_jit.errors import TraceError
from alpha_jit.ir import trace
from alpha_jit.ir.ops import registry
from alpha_jit.tensor import Tensor, full


def grad(loss: Tensor, wrt: list[int], seed: Tensor | None = None) -> dict[int, Tensor]:
    """Cotangents of `loss` with respect to the nodes `wrt` (only those that reach the loss)."""
    ctx = trace.current()
    g = ctx.graph
    if loss.shape not in ((), (1,)) and loss.numel() != 1:
        raise TraceError("backward", f"loss must be a scalar, got shape {loss.shape}",
                         ctx.provenance().where())
    if not loss.dtype.is_float:
        raise TraceError("backward", f"loss must be floating point, got {loss.dtype}",
                         ctx.provenance().where())
    ancestors = _reach(g.g._pred, [loss.node], None)
    targets = [w for w in wrt if w in ancestors]
    if not targets:
        return {}
    # nodes on some path from a target to the loss: what the targets reach without leaving
    # the loss's ancestors (a node outside them reaches none of them)
    relevant = _reach(g.g._succ, targets, ancestors)
    order = [n for n in g.topo() if n in relevant]

    cot: dict[int, Tensor] = {}
    with ctx.in_phase("bwd"):
        ctx.prov_override = g.prov(loss.node)
        cot[loss.node] = full(loss.shape, 1.0, loss.dtype) if seed is None else \
            seed.broadcast_to(loss.shape)
        for n in reversed(order):
            if n not in cot or g.op(n) in ("input", "state", "hparam"):
                continue
            opdef = registry.get(g.op(n))
            if opdef.vjp is None:
                raise TraceError(g.op(n), "has no gradient rule", g.prov(n).where())
            arg_ids = g.args(n)
            args = [Tensor(a, g.shape(a), g.dtype(a)) for a in arg_ids]
            out = Tensor(n, g.shape(n), g.dtype(n))
            ctx.prov_override = g.prov(n)  # backward nodes point at the forward source line
            grads = opdef.vjp(cot[n], args, out, g.attrs(n))
            for i, (a, ga) in enumerate(zip(arg_ids, grads, strict=True)):
                if ga is None or a not in relevant or i in opdef.nondiff_args:
                    continue
                if ga.shape != g.shape(a):
                    raise AssertionError(f"VJP of {g.op(n)} gave {ga.shape} for arg {i} of "
                                         f"shape {g.shape(a)}")
                cot[a] = cot[a] + ga if a in cot else ga
        ctx.prov_override = None
    return {t: cot[t] for t in targets if t in cot}


def _reach(adj: dict, starts: list[int], within: set[int] | None) -> set[int]:
    """`starts` and every node reachable from them along `adj` (networkx's successor or
    predecessor dicts), inside `within` when given: one sweep for all starts at once."""
    seen = set(starts)
    stack = list(seen)
    while stack:
        for v in adj[stack.pop()]:
            if v not in seen and (within is None or v in within):
                seen.add(v)
                stack.append(v)
    return seen


def backward(loss: Tensor) -> None:
    """`loss.backward()`: accumulate gradients into `p.grad` for every trainable parameter."""
    ctx = trace.current()
    trace.snapshot("after trace (forward)")
    if not ctx.grads_taken:  # forward rewrites, so autodiff differentiates the merged graph
        from alpha_jit.ir.passes.gemm_merge import PASS_NAME, merge_sibling_gemms
        from alpha_jit.ir.passes.manager import pass_errors

        with pass_errors(PASS_NAME):
            summary = merge_sibling_gemms(ctx, ctx.pass_enabled)
        if summary != "off":
            trace.snapshot(f"pass {PASS_NAME} (forward): {summary}")
    ctx.grads_taken += 1
    params = [h for h in ctx.state.values() if getattr(h, "requires_grad", False)]
    nodes = {ctx.state_value[p.state_key]: p for p in params}
    scaler = ctx.loss_scaler
    if scaler is None:
        grads = grad(loss, list(nodes))
    else:  # f16: backward runs on the scaled loss; gradients come back unscaled + a finite mask
        scaled = grad(loss, list(nodes), seed=scaler.seed().astype(loss.dtype))
        with ctx.in_phase("bwd"):
            unscaled, ok = scaler.unscale(list(scaled.values()))
        grads = dict(zip(scaled, unscaled, strict=True))
        ctx.grad_ok = ok if ctx.grad_ok is None else ctx.grad_ok * ok
    for node, gt in grads.items():
        p = nodes[node]
        old = p.grad  # a gradient kept from an earlier backward (or step) accumulates
        p.grad = gt if old is None else old + gt
    trace.snapshot("after autodiff")
