"""Optimizers recorded into the step: SGD (with momentum) and AdamW.

`opt.step()` inside a trace records the update as elementwise ops writing the parameters and
moments back as state, so fusion turns each parameter's whole update into one kernel. Values
that change every step (learning rate, Adam's bias corrections) are `hparam` inputs the host
fills on each call: changing `opt.lr` between calls never retraces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import TraceError
from alpha_jit.ir import trace
from alpha_jit.nn.loss_scale import guard
from alpha_jit.nn.module import Parameter
from alpha_jit.tensor import StateTensor, Tensor, minimum


class Optimizer:
    """Base: parameter groups (PyTorch-style dicts with per-group options), the step counter,
    and the learning rate, optionally a schedule `lr_at(step) -> lr` evaluated on the host."""

    def __init__(self, params: Iterable[Any], lr: float, **defaults: Any):
        items = list(params)
        if not items:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        groups = items if isinstance(items[0], dict) else [{"params": items}]
        self.groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.params = [p for g in self.groups for p in g["params"]]
        self.options = {p.state_key: g for g in self.groups for p in g["params"]}
        self.lr = float(lr)
        self.schedule: Callable[[int], float] | None = None
        self.step_count = 0  # updates applied so far (advanced by the executor, once per call)

    def lr_at(self, t: int) -> float:
        """The learning rate of update number t (1-based): the schedule's, else `self.lr`."""
        return float(self.schedule(t)) if self.schedule is not None else self.lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def next_hparams(self) -> dict[str, float]:
        """Called by the executor once per compiled call, before submitting the step."""
        self.step_count += 1
        return self.hparams(self.step_count)

    def hparams(self, t: int) -> dict[str, float]:
        return {"lr": self.lr_at(t)}

    def _h(self, name: str) -> Tensor:
        ctx = trace.current()
        node = ctx.hparam(self, name, dtypes.float32)
        return Tensor(node, (), dtypes.float32)

    def step(self) -> None:
        ctx = trace.current()
        with ctx.in_phase("opt"):
            for p in self.params:
                g = p.grad
                if g is None:
                    continue
                if g.shape != p.shape:
                    raise TraceError("optimizer", f"gradient of {p.state_name} has shape "
                                     f"{g.shape}, parameter {p.shape}", ctx.provenance().where())
                with ctx.in_module(p.state_name):
                    self._update(p, g)

    def _update(self, p: Parameter, g: Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _update")

    @staticmethod
    def _write(holder: StateTensor, new: Tensor) -> None:
        """Write back a parameter or moment; an overflowed f16 step keeps the old value."""
        holder.assign(guard(new, holder._t()))


class SGD(Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.0):
        super().__init__(params, lr)
        self.momentum = float(momentum)
        self.bufs = {p.state_key: StateTensor(np.zeros(p.shape, np.float32),
                                              f"{p.state_name}.momentum")
                     for p in self.params} if momentum else {}

    def _update(self, p: Parameter, g: Tensor) -> None:
        lr = self._h("lr")
        if self.momentum:
            buf = self.bufs[p.state_key]
            new_buf = buf * self.momentum + g
            self._write(buf, new_buf)
            g = new_buf
        self._write(p, p - lr * g)


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's formulation."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, weight_decay=float(weight_decay))
        self.b1, self.b2 = map(float, betas)
        self.eps = float(eps)
        self.m = {p.state_key: StateTensor(np.zeros(p.shape, np.float32), f"{p.state_name}.m")
                  for p in self.params}
        self.v = {p.state_key: StateTensor(np.zeros(p.shape, np.float32), f"{p.state_name}.v")
                  for p in self.params}

    def hparams(self, t: int) -> dict[str, float]:
        return {"lr": self.lr_at(t), "bc1": 1.0 - self.b1 ** t,
                "bc2_sqrt": math.sqrt(1.0 - self.b2 ** t)}

    def _update(self, p: Parameter, g: Tensor) -> None:
        lr, bc1, bc2_sqrt = self._h("lr"), self._h("bc1"), self._h("bc2_sqrt")
        m_s, v_s = self.m[p.state_key], self.v[p.state_key]
        m = m_s * self.b1 + g * (1.0 - self.b1)
        v = v_s * self.b2 + g * g * (1.0 - self.b2)
        wd = self.options[p.state_key]["weight_decay"]
        w = p - p * (lr * wd) if wd else p._t()
        denom = v.sqrt() / bc2_sqrt + self.eps
        self._write(p, w - (lr / bc1) * m / denom)
        self._write(m_s, m)
        self._write(v_s, v)


def clip_grad_norm_(params: Iterable[Parameter], max_norm: float) -> Tensor:
    """Scale every gradient so their joint L2 norm is at most `max_norm`; returns the norm
    before clipping (a traced scalar: reading it after the step is the only sync)."""
    ctx = trace.current()
    params = [p for p in params if p.grad is not None]
    if not params:
        raise TraceError("clip_grad_norm_", "no parameter has a gradient; call "
                         "loss.backward() first", ctx.provenance().where())
    with ctx.in_phase("opt"):
        total = None
        for p in params:
            g = p.grad
            sq = (g * g).sum()
            total = sq if total is None else total + sq
        assert total is not None
        norm = total.sqrt()
        scale = minimum(max_norm / (norm + 1e-6), 1.0)
        for p in params:
            p.grad = p.grad * scale
    return norm


def warmup_cosine(base_lr: float, warmup: int, total: int,
                  min_lr: float = 0.0) -> Callable[[int], float]:
    """Linear warmup to `base_lr` over `warmup` updates, then cosine decay to `min_lr` at
    `total`. Assign to `opt.schedule`: it runs on the host, so it never retraces."""

    def lr(t: int) -> float:
        if warmup and t <= warmup:
            return base_lr * t / warmup
        if t >= total:
            return min_lr
        frac = (t - warmup) / max(1, total - warmup)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * frac))

    return lr
