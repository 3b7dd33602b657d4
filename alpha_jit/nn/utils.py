"""Gradient clipping, shaped like `torch.nn.utils`: `clip_grad_norm_` and `clip_grad_value_`.

Both run inside a compiled step, between `loss.backward()` and `opt.step()`, and rewrite every
parameter's traced gradient. The total norm is a traced scalar: nothing here can look at its
value while tracing, so `clip_grad_norm_` returns it for the caller to read after the step (the
only host sync) instead of raising on a non-finite norm as torch's `error_if_nonfinite` does.
`foreach` is accepted for torch compatibility and ignored: the L2 norm is always one
multi-tensor reduction, and the per-gradient scaling fuses into the optimizer's update kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from alpha_jit.errors import TraceError
from alpha_jit.ir import trace
from alpha_jit.nn.module import Parameter
from alpha_jit.tensor import Tensor, maximum, minimum

__all__ = ["clip_grad_norm_", "clip_grad_value_"]

_NORM_TYPES = "2.0 (the L2 norm of all gradients together) or math.inf (the largest |g|)"


def _with_grads(op: str, parameters: Parameter | Iterable[Parameter]) -> list[Parameter]:
    """The parameters (one Parameter or an iterable, as torch accepts) that have a gradient."""
    ctx = trace.current()
    params = [parameters] if isinstance(parameters, Parameter) else list(parameters)
    for p in params:
        if not isinstance(p, Parameter):
            raise TraceError(op, f"takes Parameters (e.g. model.parameters()), got a "
                             f"{type(p).__name__}", ctx.provenance().where())
    params = [p for p in params if p.grad is not None]
    if not params:
        raise TraceError(op, "no parameter has a gradient; call loss.backward() first",
                         ctx.provenance().where())
    return params


def clip_grad_norm_(parameters: Parameter | Iterable[Parameter], max_norm: float,
                    norm_type: float | str = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> Tensor:
    """Scale every gradient so their joint norm is at most `max_norm` (gradients are multiplied
    by min(1, max_norm / (norm + 1e-6)), as in torch); returns the norm before clipping, a
    traced scalar: return it from the compiled step and read it afterwards.

    norm_type: 2.0 or inf ("inf" works too). error_if_nonfinite=True cannot be honoured inside a
    compiled step and raises; check `math.isfinite(float(norm))` after the step instead."""
    ctx = trace.current()
    where = ctx.provenance().where()
    try:
        p_norm = float(norm_type)
    except (TypeError, ValueError):
        p_norm = math.nan
    if p_norm not in (2.0, math.inf):
        raise TraceError("clip_grad_norm_", f"norm_type {norm_type!r} is not supported; use "
                         f"{_NORM_TYPES}", where)
    if error_if_nonfinite:
        raise TraceError(
            "clip_grad_norm_", "error_if_nonfinite=True cannot raise inside a compiled step: "
            "the norm is computed on the device after tracing. Pass error_if_nonfinite=False, "
            "return the norm from the step and check math.isfinite(float(norm)) after the call "
            "(an f16 step's loss scaler already skips updates with non-finite gradients)", where)
    params = _with_grads("clip_grad_norm_", parameters)
    with ctx.in_phase("opt"):
        grads = [p.grad for p in params]
        if p_norm == 2.0:
            # one multi-tensor op: two kernels for every gradient, not a reduction chain each
            norm = trace.apply("sum_squares", grads).sqrt()
        else:
            norm = grads[0].abs().max()
            for g in grads[1:]:  # max propagates NaN, as torch's inf norm does
                norm = maximum(norm, g.abs().max())
        scale = minimum(float(max_norm) / (norm + 1e-6), 1.0)
        for p in params:
            p.grad = p.grad * scale
    return norm


def clip_grad_value_(parameters: Parameter | Iterable[Parameter], clip_value: float,
                     foreach: bool | None = None) -> None:
    """Clamp every gradient element into [-clip_value, clip_value] (NaN stays NaN)."""
    ctx = trace.current()
    c = float(clip_value)
    if math.isnan(c) or c < 0.0:
        raise TraceError("clip_grad_value_", f"clip_value must be a number >= 0, got "
                         f"{clip_value!r}", ctx.provenance().where())
    params = _with_grads("clip_grad_value_", parameters)
    with ctx.in_phase("opt"):
        for p in params:
            p.grad = minimum(maximum(p.grad, -c), c)
