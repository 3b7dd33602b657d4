"""Module and Parameter: PyTorch-shaped containers whose calls record module paths.

A `Parameter` is a `StateTensor` that wants gradients; a `Module` finds its parameters and
children through attributes (so `named_parameters()` gives `fc1.weight`), and calling a module
inside a trace pushes its name so every node it records carries the module path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from alpha_jit.ir import trace
from alpha_jit.tensor import StateTensor, Tensor


class Parameter(StateTensor):
    """Trainable state. `p.grad` is the traced gradient inside a step; after the step, the
    device-resident gradient if the step left one (it did not call `zero_grad()`)."""

    requires_grad = True

    def __init__(self, data: np.ndarray, name: str = "param"):
        super().__init__(np.asarray(data, dtype=np.float32), name)
        self._grad_holder: StateTensor | None = None

    @property
    def grad(self) -> Any:
        ctx = trace.active()
        if ctx is None:
            return self._grad_holder
        if self.state_key not in ctx.grads and self._grad_holder is not None:
            ctx.grads[self.state_key] = self._grad_holder._t()
            ctx.grad_params[self.state_key] = self
        return ctx.grads.get(self.state_key)

    @grad.setter
    def grad(self, value: Any) -> None:
        ctx = trace.active()
        if ctx is None:
            self._grad_holder = value
        else:
            ctx.grads[self.state_key] = value
            ctx.grad_params[self.state_key] = self


class Module:
    """Base class: attributes that are Parameters or Modules form the tree."""

    def __init__(self) -> None:
        self._name = ""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Parameter) and value.state_name in ("param", "state"):
            value.state_name = name
        elif isinstance(value, Module):
            value._name = name  # the module path recorded in provenance
        object.__setattr__(self, name, value)

    def named_children(self) -> Iterator[tuple[str, Module]]:
        for k, v in vars(self).items():
            if isinstance(v, Module):
                yield k, v
            elif isinstance(v, list | tuple):
                for i, m in enumerate(v):
                    if isinstance(m, Module):
                        yield f"{k}.{i}", m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for name, p in self._named_parameters(prefix):
            if id(p) not in seen:  # tied weights appear once
                seen.add(id(p))
                yield name, p

    def _named_parameters(self, prefix: str) -> Iterator[tuple[str, Parameter]]:
        for k, v in vars(self).items():
            if isinstance(v, Parameter):
                yield prefix + k, v
        for k, m in self.named_children():
            yield from m._named_parameters(f"{prefix}{k}.")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def name_parameters(self) -> None:
        """Give every parameter its full dotted name (used in errors, dumps, checkpoints)."""
        for name, p in self.named_parameters():
            p.state_name = name

    def __call__(self, *args: Any, **kw: Any) -> Any:
        ctx = trace.active()
        if ctx is None or not self._name:  # the root module adds no path component
            return self.forward(*args, **kw)
        with ctx.in_module(self._name):
            return self.forward(*args, **kw)

    def forward(self, *args: Any, **kw: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward()")


class Sequential(Module):
    def __init__(self, *layers: Module):
        super().__init__()
        self.layers = list(layers)
        for i, m in enumerate(self.layers):
            m._name = str(i)
        self.name_parameters()

    def forward(self, x: Any) -> Any:
        for m in self.layers:
            x = m(x)
        return x
