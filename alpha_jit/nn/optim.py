"""Optimizers recorded into the step, shaped like torch.optim: SGD and the Adam family (Adam,
AdamW) with PyTorch's option names, defaults, formulas and `state_dict()` format.

`opt.step()` inside a trace records the update as elementwise ops writing the parameters and
moments back as state, so fusion turns each parameter's whole update into one kernel and
horizontal fusion batches the parameters' updates into multi-tensor kernels. Values that change
every step (learning rate, Adam's bias corrections) are `hparam` inputs the host fills on each
call: changing `opt.lr` between calls never retraces. Every other option is a constant of the
compiled step. PyTorch's implementation hints (`foreach`, `fused`, `capturable`) are accepted
and kept in `param_groups` but change nothing: alpha_jit's update is always compiled that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from alpha_jit import dtypes, guards
from alpha_jit.errors import AlphaJitError, TraceError
from alpha_jit.ir import trace
from alpha_jit.nn.loss_scale import guard
from alpha_jit.nn.module import Parameter
from alpha_jit.nn.utils import clip_grad_norm_
from alpha_jit.tensor import StateTensor, Tensor, maximum

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "OptimizerError", "clip_grad_norm_",
           "warmup_cosine"]

# torch's implementation choices: no effect on what alpha_jit compiles, so never compiled in
HINTS = ("foreach", "fused", "capturable", "differentiable")


class OptimizerError(AlphaJitError, ValueError):
    """A bad optimizer option, or one changed after compiling in a way that cannot apply."""


def _check_lr(name: str, value: Any) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0.0:
        raise OptimizerError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _check_nonneg(group: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        try:
            v = float(group[k])
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v) or v < 0.0:
            raise OptimizerError(f"{where}: {k} must be a finite number >= 0, got "
                                 f"{group[k]!r}")
        group[k] = v


def _check_flags(group: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        if not isinstance(group[k], bool | np.bool_):
            raise OptimizerError(f"{where}: {k} must be True or False, got {group[k]!r}")
        group[k] = bool(group[k])


class Optimizer(guards.GuardedAttrs):
    """Base: parameter groups (`param_groups`, PyTorch's name and dict format: every group holds
    every option), per-parameter state, the step counter, and the learning rate, optionally a
    schedule `lr_at(step) -> lr` evaluated on the host.

    Per-group `lr` is fed on every call (never retraces): set `opt.lr` (groups that did not
    give their own lr follow it) or `opt.param_groups[i]["lr"]`. With a schedule, a group's lr
    is scaled by `schedule(t) / opt.lr`. Other options are compiled into the step; changing one
    afterwards raises instead of being silently ignored.

    Per-parameter state (momentum buffers, Adam's moments) are `StateTensor`s named as in
    PyTorch: `opt.state[p]["exp_avg"].numpy()` reads one, `.assign(array)` writes it, before or
    after the step is compiled. `state_dict()` / `load_state_dict()` use PyTorch's format."""

    _guarded = frozenset({"_start_version"})  # compiled steps guard on it

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
            self.check_known(grp, f"parameter group {i}")
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
        # state key -> step_count when the parameter's first update was traced: a parameter
        # that starts training later (unfrozen) counts its own steps, as PyTorch's "step"
        self._start: dict[int, int] = {}
        self._traced = False  # some step() was traced: later newcomers start their own count
        self._start_version = 0  # load_state_dict replaced `_start`: compiled steps retrace
        self._starts_memo: dict[tuple, tuple[int, ...]] = {}
        self._compiled_options: list[dict[str, Any]] | None = None
        # slot name ("exp_avg", ...) -> parameter state key -> its StateTensor, made on first use
        self._slots: dict[str, dict[int, StateTensor]] = {n: {} for n in self.SLOTS}
        for g in self.param_groups:  # made now so they can be read or assigned before compiling
            for p in g["params"]:
                for name in self.slots_for(g):
                    self.slot(p, name)

    # ---- options --------------------------------------------------------------------------------
    SLOTS: tuple[str, ...] = ()  # every per-parameter state tensor this optimizer may keep

    def slots_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The per-parameter state tensors a group with these options updates."""
        return ()

    def check_known(self, options: dict[str, Any], where: str) -> None:
        unknown = sorted(set(options) - {"params", *self.defaults})
        if unknown:
            raise OptimizerError(
                f"{type(self).__name__}: {where} has unsupported option(s) {unknown}; "
                f"supported: {sorted(self.defaults)}")

    def _validate(self, group: dict[str, Any], where: str) -> None:
        group["lr"] = _check_lr(f"{where}: lr", group["lr"])
        for k in ("foreach", "fused"):
            if k in group and group[k] is not None:
                _check_flags(group, (k,), where)
        for k in ("capturable", "differentiable"):
            if k in group:
                _check_flags(group, (k,), where)
        if group.get("differentiable"):
            raise OptimizerError(
                f"{where}: differentiable=True is not supported: alpha_jit records the update "
                "after backward and never differentiates through it (leave it False)")

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

    # ---- state ----------------------------------------------------------------------------------
    def slot(self, p: Parameter, name: str) -> StateTensor:
        """Parameter p's state tensor `name` (zeros until the first update writes it)."""
        table = self._slots[name]
        if p.state_key not in table:
            from alpha_jit.runtime.step import mark_zero

            holder = StateTensor(np.zeros(p.shape, np.float32), f"{p.state_name}.{name}")
            # known zero: the step fills it on the GPU, no scan of its bytes (read-only until
            # `assign` replaces it, so an in-place write cannot falsify that)
            mark_zero(holder._host)
            table[p.state_key] = holder
        return table[p.state_key]

    @property
    def state(self) -> dict[Parameter, dict[str, StateTensor]]:
        """{parameter: {"exp_avg": StateTensor, ...}}, like PyTorch's `optimizer.state`: a
        fresh view (read or `.assign()` the tensors; the dict itself is not kept). The step
        count is `step_count`, one for all parameters."""
        return {p: {n: self._slots[n][p.state_key] for n in self.SLOTS
                    if p.state_key in self._slots[n]} for p in self.params}

    def state_dict(self) -> dict[str, Any]:
        """PyTorch's format: {"state": {index: {"step", moments as numpy}}, "param_groups":
        [{options..., "params": [indices]}]}; see `alpha_jit.nn.optim_state`."""
        from alpha_jit.nn import optim_state

        return optim_state.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load `state_dict()` output, or a torch optimizer's (tensors or `.numpy()` arrays)."""
        from alpha_jit.nn import optim_state

        optim_state.load_state_dict(self, state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # alpha_jit gradients are traced values: there is nothing to fill with zeros
        for p in self.params:
            p.grad = None

    # ---- per call -------------------------------------------------------------------------------
    def next_hparams(self) -> dict[str, float]:
        """Called by the executor once per compiled call, before submitting the step."""
        self._check_unchanged()
        self.step_count += 1
        return self.hparams(self.step_count)

    def hparams(self, t: int) -> dict[str, float]:
        return {f"lr/{i}": self.group_lr(i, t) for i in range(len(self.param_groups))}

    def _options(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in ("params", "lr", *HINTS)}
                for g in self.param_groups]

    def _check_unchanged(self) -> None:
        """Options other than lr are constants of the compiled step: a change must not be
        silently ignored."""
        olds = self._compiled_options
        if olds is None:
            return
        groups = self.param_groups
        # every call: one C-level read per group; the slow loop below only names the change
        if len(groups) == len(olds) and all(tuple(map(g.get, old)) == tuple(old.values())
                                            for g, old in zip(groups, olds, strict=True)):
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

    # ---- tracing --------------------------------------------------------------------------------
    def _h(self, name: str) -> Tensor:
        ctx = trace.current()
        node = ctx.hparam(self, name, dtypes.float32)
        return Tensor(node, (), dtypes.float32)

    def step(self, closure: None = None) -> None:
        """Record the update of every parameter that has a gradient into the traced step."""
        ctx = trace.current()
        if closure is not None:
            raise TraceError("optimizer", "step(closure) is not supported: the loss and "
                             "backward are part of the compiled step already",
                             ctx.provenance().where())
        for i, g in enumerate(self.param_groups):
            self._validate(g, f"{type(self).__name__} parameter group {i}")
        self._compiled_options = self._options()
        ctx.guard(self, "_start_version")  # the per-parameter step offsets are baked in
        with ctx.in_phase("opt"):
            for p in self.params:
                g = p.grad
                if g is None:
                    continue
                if g.shape != p.shape:
                    raise TraceError("optimizer", f"gradient of {p.state_name} has shape "
                                     f"{g.shape}, parameter {p.shape}", ctx.provenance().where())
                i = self._group_of[p.state_key]
                # a parameter joining after others were updated (unfrozen) starts its own
                # count now; on the first trace (also after a resume) every count is step_count
                self._start.setdefault(p.state_key, self.step_count if self._traced else 0)
                with ctx.in_module(p.state_name):
                    self._update(p, g, i, self.param_groups[i])
        self._traced = True

    def _update(self, p: Parameter, g: Tensor, i: int, group: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _update")

    def _own(self, name: str, p: Parameter) -> str:
        """The hparam `name` (e.g. "bc1/0") as seen by p's own step count."""
        return self._own_name(name, self._start.get(p.state_key, 0))

    def _starts(self, i: int) -> tuple[int, ...]:
        """The distinct first-update offsets of group i's parameters (memoised: `_start` only
        grows while tracing, or is replaced with `_start_version` bumped)."""
        params = self.param_groups[i]["params"]
        key = (i, len(self._start), self._start_version, len(params))
        hit = self._starts_memo.get(key)
        if hit is None:
            found = {self._start.get(p.state_key, 0) for p in params} | {0}
            hit = self._starts_memo[key] = tuple(sorted(found))
        return hit

    @staticmethod
    def _own_name(name: str, start: int) -> str:
        return name if start == 0 else f"{name}+{start}"

    def param_step(self, p: Parameter) -> int:
        """Updates applied to `p` (PyTorch's per-parameter "step"). A parameter no traced
        step has updated has 0, unless nothing was traced yet (a resumed optimizer whose
        `step_count` was set: every parameter has that many)."""
        if p.state_key in self._start:
            return max(0, self.step_count - self._start[p.state_key])
        return 0 if self._traced else self.step_count

    @staticmethod
    def _write(holder: StateTensor, new: Tensor) -> None:
        """Write back a parameter or moment; an overflowed f16 step keeps the old value."""
        holder.assign(guard(new, holder._t()))


class SGD(Optimizer):
    """SGD with momentum, dampening, Nesterov, (L2, added to the gradient) weight decay and
    maximize, PyTorch's formulation: the first step's momentum buffer is the gradient itself.
    `foreach`/`fused` are accepted and ignored (the update is always fused);
    `differentiable=True` is not supported."""

    SLOTS = ("momentum_buffer",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize, foreach=foreach,
                                      differentiable=differentiable, fused=fused))
        self.bufs = self._slots["momentum_buffer"]  # state key -> buffer (older name)

    def slots_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] else ()

    def _validate(self, group: dict[str, Any], where: str) -> None:
        super()._validate(group, where)
        _check_nonneg(group, ("momentum", "dampening", "weight_decay"), where)
        _check_flags(group, ("nesterov", "maximize"), where)
        if group["nesterov"] and (group["momentum"] <= 0.0 or group["dampening"] != 0.0):
            raise OptimizerError(f"{where}: nesterov needs momentum > 0 and dampening 0")

    @property
    def momentum(self) -> float:
        return float(self.defaults["momentum"])

    def hparams(self, t: int) -> dict[str, float]:
        out = super().hparams(t)
        for i, g in enumerate(self.param_groups):  # PyTorch: no dampening on the first step
            for s in self._starts(i):
                out[self._own_name(f"dscale/{i}", s)] = 1.0 if t - s == 1 else \
                    1.0 - g["dampening"]
        return out

    def _update(self, p: Parameter, g: Tensor, i: int, group: dict[str, Any]) -> None:
        lr = self._h(f"lr/{i}")
        if group["maximize"]:
            g = -g
        if group["weight_decay"]:
            g = g + p * group["weight_decay"]
        if group["momentum"]:
            buf = self.slot(p, "momentum_buffer")
            scaled = g * self._h(self._own(f"dscale/{i}", p)) if group["dampening"] else g
            new_buf = buf * group["momentum"] + scaled
            self._write(buf, new_buf)
            g = g + new_buf * group["momentum"] if group["nesterov"] else new_buf
        self._write(p, p - lr * g)


class Adam(Optimizer):
    """Adam, PyTorch's formulation: weight decay is L2 (added to the gradient) unless
    `decoupled_weight_decay=True` (which is AdamW); `amsgrad` normalises by the running maximum
    of the second moment (kept as state `max_exp_avg_sq`); `maximize` ascends. Every option may
    differ per parameter group. `foreach`/`fused`/`capturable` are accepted and ignored (the
    update is always fused); `differentiable=True` is not supported."""

    SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 decoupled_weight_decay: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                                      capturable=capturable, differentiable=differentiable,
                                      fused=fused, decoupled_weight_decay=decoupled_weight_decay))
        # state key -> moment (older names, kept for checkpoints and tests)
        self.m = self._slots["exp_avg"]
        self.v = self._slots["exp_avg_sq"]
        self.v_max = self._slots["max_exp_avg_sq"]

    def slots_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self.SLOTS if group["amsgrad"] else self.SLOTS[:2]

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
        eps = float(group["eps"])
        if not (math.isfinite(eps) and eps > 0.0):
            raise OptimizerError(f"{where}: eps must be a finite number > 0, got "
                                 f"{group['eps']!r}")
        group["eps"] = eps
        _check_nonneg(group, ("weight_decay",), where)
        _check_flags(group, ("amsgrad", "maximize", "decoupled_weight_decay"), where)

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
            for s in self._starts(i):  # bias corrections by each parameter's own step
                n = max(t - s, 1)
                out[self._own_name(f"bc1/{i}", s)] = 1.0 - b1 ** n
                out[self._own_name(f"bc2_sqrt/{i}", s)] = math.sqrt(1.0 - b2 ** n)
        return out

    def _update(self, p: Parameter, g: Tensor, i: int, group: dict[str, Any]) -> None:
        lr = self._h(f"lr/{i}")
        bc1, bc2_sqrt = self._h(self._own(f"bc1/{i}", p)), self._h(self._own(f"bc2_sqrt/{i}", p))
        b1, b2 = group["betas"]
        wd = group["weight_decay"]
        if group["maximize"]:
            g = -g
        w = p._t()
        if wd and group["decoupled_weight_decay"]:
            w = p - p * (lr * wd)
        elif wd:
            g = g + w * wd
        m_s, v_s = self.slot(p, "exp_avg"), self.slot(p, "exp_avg_sq")
        m = m_s * b1 + g * (1.0 - b1)
        v = v_s * b2 + g * g * (1.0 - b2)
        v_hat = v
        if group["amsgrad"]:
            v_max_s = self.slot(p, "max_exp_avg_sq")
            v_hat = maximum(v_max_s, v)
            self._write(v_max_s, v_hat)
        denom = v_hat.sqrt() / bc2_sqrt + group["eps"]
        self._write(p, w - (lr / bc1) * m / denom)
        self._write(m_s, m)
        self._write(v_s, v)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): `Adam` with
    `decoupled_weight_decay=True` and PyTorch's AdamW defaults (weight_decay 0.01)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)


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
