"""The training steps most end-to-end tests compile: a regression, a classifier, a language
model."""

from __future__ import annotations

import alpha_jit as aj
from alpha_jit.nn import functional as F


def regression_step(model, opt) -> aj.CompiledFunction:
    """forward, mean squared error, backward, optimizer update, zero_grad: returns the loss."""

    @aj.compile
    def step(x, y):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


def linear_grads_step(lin, precision: str = "f32") -> aj.CompiledFunction:
    """Sum of squared errors of one Linear, backward; returns (loss, dW, db) and clears them."""

    @aj.compile(precision=precision)
    def step(x, t):
        out = lin(x)
        loss = ((out - t) * (out - t)).sum()
        loss.backward()
        grads = (lin.weight.grad, lin.bias.grad)
        lin.weight.grad = lin.bias.grad = None
        return (loss, *grads)

    return step


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


def lm_step(model, opt, precision: str = "f32", clip: float | None = None
            ) -> aj.CompiledFunction:
    """A GPT's step: forward with targets, backward, optional clip_grad_norm_, update,
    zero_grad; returns the loss (and the pre-clip norm when clipping)."""
    from alpha_jit import nn

    @aj.compile(precision=precision)
    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        norm = nn.clip_grad_norm_(model.parameters(), clip) if clip is not None else None
        opt.step()
        opt.zero_grad()
        return loss if norm is None else (loss, norm)

    return step
