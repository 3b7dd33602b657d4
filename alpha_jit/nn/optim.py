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
from alpha_jit.errors import AlphaJitError, TraceError
from alpha_jit.ir import trace
from alpha_jit.nn.loss_scale import guard
from alpha_jit.nn.module import Parameter
from alpha_jit.tensor import StateTensor, Tensor, minimum


class OptimizerError(AlphaJitError, ValueError):
    """A bad optimizer option, or one changed after compiling in a way that cannot apply."""


def _check_lr(name: str, value: Any) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise OptimizerError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


class Optimizer:
    """Base: parameter groups (`param_groups`, PyTorch's name and dict format: every group holds
    every option), the step counter, and the learning rate, optionally a schedule
    `lr_at(step) -> lr` evaluated on the host.

    Per-group `lr` is fed on every call (never retraces): set `opt.lr` (groups that did not
    give their own lr follow it) or `opt.param_groups[i]["lr"]`. With a schedule, a group's lr
    is scaled by `schedule(t) / opt.lr`. Other options are compiled into the step; changing one
    afterwards raises instead of being silently ignored."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]):
        items = list(params)
        if not items:
            raise OptimizerError(f"{type(self).__name__} got an empty parameter list")
        groups = items if isinstance(items[0], dict) else [{"params": items}]
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self._own_lr: list[bool] = []  # whether the group set its own lr (else it follows opt.lr)
        seen: dict[int, int] = {}
        for i, grp in enumerate(groups):
            if not isinstance(grp, dict) or "params" not in grp:
                raise OptimizerError(f"{type(self).__name__}: parameter group {i} must be a "
                                     "dict with a 'params' list (or pass a list of parameters)")
            unknown = sorted(set(grp) - {"params", *self.defaults})
            if unknown:
                raise OptimizerError(
                    f"{type(self).__name__}: parameter group {i} has unsupported option(s) "
                    f"{unknown}; supported: {sorted(self.defaults)}")
            group = {**self.defaults, **grp, "params": list(grp["params"])}
            for p in group["params"]:
                if not isinstance(p, Parameter):
                    raise OptimizerError(f"{type(self).__name__}: parameter group {i} holds a "
                                         f"{type(p).__name__}, not a Parameter")
                if p.state_key in seen:
                    raise OptimizerError(f"{type(self).__name__}: {p.state_name} appears in "
                                         f"parameter groups {seen[p.state_key]} and {i}")
                seen[p.state_key] = i
            self._validate(group, f"{type(self).__name__} parameter group {i}")
            self.param_groups.append(group)
            self._own_lr.append("lr" in grp)
        self.params = [p for g in self.param_groups for p in g["params"]]
        self._group_of = {p.state_key: i for i, g in enumerate(self.param_groups)
                          for p in g["params"]}
        self.schedule: Callable[[int], float] | None = None
        self.step_count = 0  # updates applied so far (advanced by the executor, once per call)
        self._compiled_options: list[dict[str, Any]] | None = None

    def _validate(self, group: dict[str, Any], where: str) -> None:
        group["lr"] = _check_lr(f"{where}: lr", group["lr"])

    @property
    def groups(self) -> list[dict[str, Any]]:
        return self.param_groups

    @property
    def lr(self) -> float:
        """The default learning rate; setting it moves every group without its own lr."""
        return float(self.defaults["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        v = _check_lr(f"{type(self).__name__}.lr", value)
        self.defaults["lr"] = v
        for g, own in zip(self.param_groups, self._own_lr, strict=True):
            if not own:
                g["lr"] = v

    def lr_at(self, t: int) -> float:
        """The learning rate of update number t (1-based): the schedule's, else `self.lr`."""
        return float(self.schedule(t)) if self.schedule is not None else self.lr

    def group_lr(self, i: int, t: int) -> float:
        """Group i's learning rate for update t."""
        g = self.param_groups[i]
        lr = _check_lr(f"{type(self).__name__} parameter group {i}: lr", g["lr"])
        if self.schedule is None:
            return lr
        if not self._own_lr[i]:
            return self.lr_at(t)
        return lr * self.lr_at(t) / self.lr if self.lr else lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def next_hparams(self) -> dict[str, float]:
        """Called by the executor once per compiled call, before submitting the step."""
        self._check_unchanged()
        self.step_count += 1
        return self.hparams(self.step_count)

    def hparams(self, t: int) -> dict[str, float]:
        return {f"lr/{i}": self.group_lr(i, t) for i in range(len(self.param_groups))}

    def _options(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in ("params", "lr")}
                for g in self.param_groups]

    def _check_unchanged(self) -> None:
        """Options other than lr are constants of the compiled step: a change must not be
        silently ignored."""
        if self._compiled_options is None:
            return
        for i, (old, new) in enumerate(zip(self._compiled_options, self._options(),
                                           strict=True)):
            for k in old:
                if old[k] != new.get(k):
                    raise OptimizerError(
                        f"{type(self).__name__} parameter group {i}: option {k!r} changed "
                        f"from {old[k]!r} to {new.get(k)!r} after the step was compiled; only "
                        "'lr' is fed per call. Build a new optimizer (and compiled step) to "
                        "change it.")

    def _h(self, name: str) -> Tensor:
        ctx = trace.current()
        node = ctx.hparam(self, name, dtypes.float32)
        return Tensor(node, (), dtypes.float32)

    def step(self) -> None:
        ctx = trace.current()
        for i, g in enumerate(self.param_groups):
            self._validate(g, f"{type(self).__name__} parameter group {i}")
        self._compiled_options = self._options()
        with ctx.in_phase("opt"):
            for p in self.params:
                g = p.grad
                if g is None:
                    continue
                if g.shape != p.shape:
                    raise TraceError("optimizer", f"gradient of {p.state_name} has shape "
                                     f"{g.shape}, parameter {p.shape}", ctx.provenance().where())
                i = self._group_of[p.state_key]
                with ctx.in_module(p.state_name):
                    self._update(p, g, i, self.param_groups[i])

    def _update(self, p: Parameter, g: Tensor, i: int, group: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _update")

    @staticmethod
    def _write(holder: StateTensor, new: Tensor) -> None:
        """Write back a parameter or moment; an overflowed f16 step keeps the old value."""
        holder.assign(guard(new, holder._t()))


class SGD(Optimizer):
    """SGD with momentum, dampening, Nesterov and (L2, added to the gradient) weight decay,
    PyTorch's formulation: the first step's momentum buffer is the gradient itself."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))
        self.bufs = {p.state_key: StateTensor(np.zeros(p.shape, np.float32),
                                              f"{p.state_name}.momentum")
                     for g in self.param_groups if g["momentum"] for p in g["params"]}

    def _validate(self, group: dict[str, Any], where: str) -> None:
        super()._validate(group, where)
        for k in ("momentum", "dampening", "weight_decay"):
            v = float(group[k])
            if not math.isfinite(v) or v < 0.0:
                raise OptimizerError(f"{where}: {k} must be a finite number >= 0, got "
                                     f"{group[k]!r}")
            group[k] = v
        group["nesterov"] = bool(group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0.0 or group["dampening"] != 0.0):
            raise OptimizerError(f"{where}: nesterov needs momentum > 0 and dampening 0")

    @property
    def momentum(self) -> float:
        return float(self.defaults["momentum"])

    def hparams(self, t: int) -> dict[str, float]:
        out = super().hparams(t)
        for i, g in enumerate(self.param_groups):  # PyTorch: no dampening on the first step
            out[f"dscale/{i}"] = 1.0 if t == 1 else 1.0 - g["dampening"]
        return out

    def _update(self, p: Parameter, g: Tensor, i: int, group: dict[str, Any]) -> None:
        lr = self._h(f"lr/{i}")
        if group["weight_decay"]:
            g = g + p * group["weight_decay"]
        if group["momentum"]:
            buf = self.bufs[p.state_key]
            scaled = g * self._h(f"dscale/{i}") if group["dampening"] else g
            new_buf = buf * group["momentum"] + scaled
            self._write(buf, new_buf)
            g = g + new_buf * group["momentum"] if group["nesterov"] else new_buf
        self._write(p, p - lr * g)


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch's formulation; every
    option may differ per parameter group."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.m = {p.state_key: StateTensor(np.zeros(p.shape, np.float32), f"{p.state_name}.m")
                  for p in self.params}
        self.v = {p.state_key: StateTensor(np.zeros(p.shape, np.float32), f"{p.state_name}.v")
                  for p in self.params}

    def _validate(self, group: dict[str, Any], where: str) -> None:
        super()._validate(group, where)
        try:
            b1, b2 = (float(b) for b in group["betas"])
        except (TypeError, ValueError):
            raise OptimizerError(f"{where}: betas must be two numbers, got "
                                 f"{group['betas']!r}") from None
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise OptimizerError(f"{where}: betas must lie in [0, 1), got {group['betas']!r}")
        group["betas"] = (b1, b2)
        eps, wd = float(group["eps"]), float(group["weight_decay"])
        if not (math.isfinite(eps) and eps > 0.0):
            raise OptimizerError(f"{where}: eps must be a finite number > 0, got "
                                 f"{group['eps']!r}")
        if not (math.isfinite(wd) and wd >= 0.0):
            raise OptimizerError(f"{where}: weight_decay must be a finite number >= 0, got "
                                 f"{group['weight_decay']!r}")
        group["eps"], group["weight_decay"] = eps, wd

    @property
    def b1(self) -> float:
        return float(self.defaults["betas"][0])

    @property
    def b2(self) -> float:
        return float(self.defaults["betas"][1])

    @property
    def eps(self) -> float:
        return float(self.defaults["eps"])

    def hparams(self, t: int) -> dict[str, float]:
        out = super().hparams(t)
        for i, g in enumerate(self.param_groups):
            b1, b2 = g["betas"]
            out[f"bc1/{i}"] = 1.0 - b1 ** t
            out[f"bc2_sqrt/{i}"] = math.sqrt(1.0 - b2 ** t)
        return out

    def _update(self, p: Parameter, g: Tensor, i: int, group: dict[str, Any]) -> None:
        lr, bc1, bc2_sqrt = self._h(f"lr/{i}"), self._h(f"bc1/{i}"), self._h(f"bc2_sqrt/{i}")
        b1, b2 = group["betas"]
        m_s, v_s = self.m[p.state_key], self.v[p.state_key]
        m = m_s * b1 + g * (1.0 - b1)
        v = v_s * b2 + g * g * (1.0 - b2)
        wd = group["weight_decay"]
        w = p - p * (lr * wd) if wd else p._t()
        denom = v.sqrt() / bc2_sqrt + group["eps"]
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
        # one multi-tensor op: two kernels for every gradient, not a reduction chain each
        norm = trace.apply("sum_squares", [p.grad for p in params]).sqrt()
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
