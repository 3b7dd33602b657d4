"""The classifier training step most end-to-end tests compile."""

from __future__ import annotations

import alpha_jit as aj
from alpha_jit.nn import functional as F


def classifier_step(model, opt) -> aj.CompiledFunction:
    """forward, cross-entropy, backward, optimizer update, zero_grad: returns the loss."""

    @aj.compile
    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step
