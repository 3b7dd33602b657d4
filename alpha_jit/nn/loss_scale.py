"""Dynamic loss scaling for f16 steps, decided on the GPU with no host sync.

f16 gradients underflow unless the loss is scaled up before backward. The scale lives on the
device: backward seeds the loss cotangent with it and unscales every gradient right away; an
inf/nan in any gradient turns the `ok` mask to 0, which makes the optimizer keep weights and
moments unchanged, halves the scale, and resets the clean-step count; after `growth_interval`
clean steps the scale doubles. All of it is ordinary graph nodes: replay needs nothing new.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alpha_jit.ir import trace
from alpha_jit.tensor import StateTensor, Tensor, where


class LossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 max_scale: float = 2.0 ** 24):
        self.scale = StateTensor(np.asarray(init_scale, np.float32), "loss_scale")
        self.good_steps = StateTensor(np.asarray(0.0, np.float32), "loss_scale.good_steps")
        self.growth_interval = int(growth_interval)
        self.max_scale = float(max_scale)

    def seed(self) -> Tensor:
        """The loss cotangent: the current scale."""
        return self.scale._t()

    def unscale(self, grads: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Gradients divided by the scale, and an f32 mask: 1 if all are finite, else 0."""
        inv = 1.0 / self.scale._t()
        out = [g * inv for g in grads]
        bad = None
        for g in out:
            nonfinite = (1.0 - trace.apply("isfinite", [g])).sum()
            bad = nonfinite if bad is None else bad + nonfinite
        assert bad is not None
        return out, bad.eq(0.0)

    def finish(self, ok: Tensor) -> None:
        """Record the scale update for the end of the step."""
        scale, good = self.scale._t(), self.good_steps._t()
        grow = (good + 1.0) >= float(self.growth_interval)
        grown = where(grow, (scale * 2.0).astype(scale.dtype), scale)
        from alpha_jit.tensor import minimum

        self.scale.assign(where(ok, minimum(grown, self.max_scale), scale * 0.5))
        self.good_steps.assign(where(ok, where(grow, 0.0, good + 1.0), 0.0))


def guard(new: Any, old: Any) -> Any:
    """Inside a loss-scaled step: keep `old` when this step's gradients overflowed."""
    ctx = trace.current()
    if ctx.grad_ok is None:
        return new
    return where(ctx.grad_ok, new, old)
