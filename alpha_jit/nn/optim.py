"""Optimizers recorded into the step: SGD (with momentum) and AdamW.

`opt.step()` inside a trace records the update as elementwise ops writing the parameters and
moments back as state, so fusion turns each parameter's whole update into one kernel. Values
that change every step (learning rate, Adam's bias corrections) are `hparam` inputs the host
fills on each call: changing `opt.lr` between calls never retraces.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import TraceError
from alpha_jit.ir import trace
from alpha_jit.nn.module import Parameter
from alpha_jit.tensor import StateTensor, Tensor


class Optimizer:
    def __init__(self, params: Iterable[Parameter], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        self.lr = float(lr)
        self.step_count = 0  # updates applied so far (advanced by the executor, once per call)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def next_hparams(self) -> dict[str, float]:
        """Called by the executor once per compiled call, before submitting the step."""
        self.step_count += 1
        return self.hparams(self.step_count)

    def hparams(self, t: int) -> dict[str, float]:
        return {"lr": self.lr}

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
        raise NotImplementedError


class SGD(Optimizer):
    def __init__(self, params: Iterable[Parameter], lr: float = 1e-2, momentum: float = 0.0):
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
            buf.assign(new_buf)
            g = new_buf
        p.assign(p - lr * g)


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's formulation."""

    def __init__(self, params: Iterable[Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr)
        self.b1, self.b2 = map(float, betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.m = {p.state_key: StateTensor(np.zeros(p.shape, np.float32), f"{p.state_name}.m")
                  for p in self.params}
        self.v = {p.state_key: StateTensor(np.zeros(p.shape, np.float32), f"{p.state_name}.v")
                  for p in self.params}

    def hparams(self, t: int) -> dict[str, float]:
        return {"lr": self.lr, "bc1": 1.0 - self.b1 ** t,
                "bc2_sqrt": math.sqrt(1.0 - self.b2 ** t)}

    def _update(self, p: Parameter, g: Tensor) -> None:
        lr, bc1, bc2_sqrt = self._h("lr"), self._h("bc1"), self._h("bc2_sqrt")
        m_s, v_s = self.m[p.state_key], self.v[p.state_key]
        m = m_s * self.b1 + g * (1.0 - self.b1)
        v = v_s * self.b2 + g * g * (1.0 - self.b2)
        w = p - p * (lr * self.weight_decay) if self.weight_decay else p._t()
        denom = v.sqrt() / bc2_sqrt + self.eps
        p.assign(w - (lr / bc1) * m / denom)
        m_s.assign(m)
        v_s.assign(v)
