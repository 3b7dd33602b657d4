"""Tensor methods as top-level functions: `alpha_jit.exp(x)` as `torch.exp(x)`.

Why: ported code calls both spellings (`torch.sum(x, dim=1)` and `x.sum(1)`). Each function
here is the method of the same name on `as_tensor(x)`, so the two can never disagree.
"""

from __future__ import annotations

from typing import Any

from alpha_jit.tensor import Tensor, as_tensor, where


def _method(name: str) -> Any:
    def fn(x: Any, *args: Any, **kw: Any) -> Any:
        return getattr(as_tensor(x), name)(*args, **kw)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"`alpha_jit.{name}(x, ...)` is `x.{name}(...)` (PyTorch's `torch.{name}`)."
    return fn


abs = _method("abs")  # noqa: A001
amax = _method("amax")
amin = _method("amin")
max = _method("max")  # noqa: A001
min = _method("min")  # noqa: A001
argmax = _method("argmax")
argmin = _method("argmin")
clamp = clip = _method("clamp")
cos = _method("cos")
erf = _method("erf")
exp = _method("exp")
flatten = _method("flatten")
floor = _method("floor")
chunk = _method("chunk")
split = _method("split")
unbind = _method("unbind")
narrow = _method("narrow")
softmax = _method("softmax")
log_softmax = _method("log_softmax")
square = _method("square")
numel = _method("numel")
log = _method("log")
logsumexp = _method("logsumexp")
mean = _method("mean")
permute = _method("permute")
reshape = _method("reshape")
rsqrt = _method("rsqrt")
sigmoid = _method("sigmoid")
sin = _method("sin")
sqrt = _method("sqrt")
squeeze = _method("squeeze")
std = _method("std")
sum = _method("sum")  # noqa: A001
tanh = _method("tanh")
transpose = _method("transpose")
unsqueeze = _method("unsqueeze")
var = _method("var")


def masked_fill(x: Any, mask: Any, value: Any) -> Tensor:
    return where(mask, value, x)


def matmul(a: Any, b: Any) -> Tensor:
    return as_tensor(a) @ b


mm = bmm = matmul


def pow(a: Any, b: Any) -> Tensor:  # noqa: A001
    return as_tensor(a) ** b if not isinstance(a, int | float) else b.__rpow__(a)


def remainder(a: Any, b: Any) -> Tensor:
    return as_tensor(a) % b


def floor_divide(a: Any, b: Any) -> Tensor:
    return as_tensor(a) // b
