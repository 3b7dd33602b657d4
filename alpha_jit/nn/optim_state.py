"""Optimizer `state_dict()` / `load_state_dict()` in PyTorch's format.

The format is torch.optim's, so a dict saved here can be reloaded here and one saved by torch
(after `.numpy()`, or still holding torch tensors) continues training where torch stopped:

    {"state": {0: {"step": 2.0, "exp_avg": ndarray, "exp_avg_sq": ndarray}, ...},
     "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), ..., "params": [0, 1]}, ...]}

Parameters are numbered in group order. A parameter's state holds "step" and its state tensors
by PyTorch's names (`exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` for Adam/AdamW with amsgrad,
`momentum_buffer` for SGD with momentum). A parameter's "step" counts its own updates
(`Optimizer.param_step`: one that started training later, e.g. unfrozen, has fewer);
loading sets `step_count` to the largest and each parameter's start from its own. A
parameter never updated has no state, as in torch. torch's SGD keeps no "step": alpha_jit's
SGD writes one too
(learning-rate schedules need it, and torch ignores it), and loading torch's SGD state sets
`step_count` to 1 when momentum buffers are present (they exist only after a first step, and
the next update must apply dampening); set `opt.step_count` afterwards if a schedule depends on
it. Loading replaces every group's options, as torch does: changing an option a compiled step
has baked in raises at that step's next call.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from alpha_jit.nn.module import Parameter
from alpha_jit.nn.optim import Optimizer, OptimizerError
from alpha_jit.nn.state_dict import host_array

# param_groups keys torch adds for its own bookkeeping (LR schedulers, named parameters)
IGNORED_GROUP_KEYS = ("initial_lr", "param_names")


def _error(opt: Optimizer, message: str) -> OptimizerError:
    return OptimizerError(f"{type(opt).__name__}.load_state_dict: {message}")


def _plain(value: Any) -> Any:
    """An option value as torch keeps it: tuples stay tuples, numbers stay numbers."""
    return tuple(value) if isinstance(value, list) else copy.copy(value)


def state_dict(opt: Optimizer) -> dict[str, Any]:
    """The optimizer's state in PyTorch's format, every tensor a fresh numpy copy."""
    index = {p.state_key: i for i, p in enumerate(opt.params)}
    groups = []
    for g in opt.param_groups:
        entry = {k: _plain(v) for k, v in g.items() if k != "params"}
        entry["params"] = [index[p.state_key] for p in g["params"]]
        groups.append(entry)
    state: dict[int, dict[str, Any]] = {}
    if opt.step_count > 0:  # torch has no state before the first step
        for p in opt.params:
            if opt.param_step(p) == 0:
                continue  # not updated yet: no state, as in torch
            group = opt.param_groups[opt._group_of[p.state_key]]
            entry = {"step": float(opt.param_step(p))}
            for name in opt.slots_for(group):
                entry[name] = opt.slot(p, name).numpy()
            state[index[p.state_key]] = entry
    return {"state": state, "param_groups": groups}


def _loaded_groups(opt: Optimizer, saved: Any) -> list[dict[str, Any]]:
    """The new param_groups (validated, nothing applied yet)."""
    if not isinstance(saved, list | tuple) or len(saved) != len(opt.param_groups):
        n = len(saved) if isinstance(saved, list | tuple) else type(saved).__name__
        raise _error(opt, f"the state dict has {n} parameter groups, the optimizer "
                     f"{len(opt.param_groups)}")
    out = []
    for i, (group, sg) in enumerate(zip(opt.param_groups, saved, strict=True)):
        if not isinstance(sg, dict) or "params" not in sg:
            raise _error(opt, f"parameter group {i} must be a dict with 'params'")
        if len(sg["params"]) != len(group["params"]):
            raise _error(opt, f"parameter group {i} has {len(sg['params'])} parameters in "
                         f"the state dict, {len(group['params'])} in the optimizer")
        options = {k: _plain(v) for k, v in sg.items()
                   if k != "params" and k not in IGNORED_GROUP_KEYS}
        opt.check_known(options, f"parameter group {i} of the state dict")
        # options missing from an older torch's dict keep their current values
        new = {**group, **options, "params": group["params"]}
        opt._validate(new, f"{type(opt).__name__}.load_state_dict: parameter group {i}")
        out.append(new)
    return out


def _loaded_state(opt: Optimizer, saved: Any, groups: list[dict[str, Any]]
                  ) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, float]]:
    """{state key: {slot: array}} and {state key: "step"}, checked against the parameters
    (shapes, names, indices)."""
    if not isinstance(saved, dict):
        raise _error(opt, f"'state' must be a dict, got {type(saved).__name__}")
    params: list[Parameter] = [p for g in groups for p in g["params"]]
    out: dict[int, dict[str, np.ndarray]] = {}
    steps: dict[int, float] = {}
    for key, entry in saved.items():
        try:
            i = int(key)  # JSON turns the int keys into strings
        except (TypeError, ValueError):
            raise _error(opt, f"state key {key!r} is not a parameter index") from None
        if not 0 <= i < len(params):
            raise _error(opt, f"state for parameter {i}, but the optimizer has {len(params)}")
        if not isinstance(entry, dict):
            raise _error(opt, f"state of parameter {i} must be a dict")
        p = params[i]
        arrays: dict[str, np.ndarray] = {}
        for name, value in entry.items():
            if value is None:  # older torch: {"momentum_buffer": None} without momentum
                continue
            if name == "step":
                steps[p.state_key] = float(host_array(value))
                continue
            if name not in opt.SLOTS:
                raise _error(opt, f"state of parameter {i} ({p.state_name}) has an unknown "
                             f"entry {name!r}; {type(opt).__name__} keeps {list(opt.SLOTS)}")
            arr = host_array(value)
            if arr.shape != p.shape:
                raise _error(opt, f"{name} of parameter {i} ({p.state_name}) has shape "
                             f"{arr.shape}, the parameter {p.shape}")
            arrays[name] = arr.astype(np.float32)
        want = opt.slots_for(groups[opt._group_of[p.state_key]])
        missing = [n for n in want if n not in arrays]
        if missing:
            raise _error(opt, f"state of parameter {i} ({p.state_name}) lacks {missing}, "
                         "which its group's options need")
        out[p.state_key] = arrays
    return out, steps


def _step_count(opt: Optimizer, steps: dict[int, float],
                state: dict[int, dict[str, np.ndarray]]) -> int:
    for t in steps.values():
        if not (t >= 0 and t == int(t)):
            raise _error(opt, f"step must be a whole number >= 0, got {t}")
    if steps:
        return int(max(steps.values()))
    # torch's SGD keeps no step: its buffers exist only after a first update
    return 1 if any(state.values()) else 0


def load_state_dict(opt: Optimizer, sd: dict[str, Any]) -> None:
    """Replace the options, state tensors and step count with those of `sd` (validated
    entirely before anything changes). Parameters without saved state start from zeros."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise _error(opt, "expected a dict with 'state' and 'param_groups' (from "
                     "optimizer.state_dict())")
    groups = _loaded_groups(opt, sd["param_groups"])
    state, steps = _loaded_state(opt, sd["state"], groups)
    step_count = _step_count(opt, steps, state)
    for group, new in zip(opt.param_groups, groups, strict=True):
        group.update(new)  # in place: references to the group dicts stay valid
    for p in opt.params:
        arrays = state.get(p.state_key, {})
        for name in opt.slots_for(opt.param_groups[opt._group_of[p.state_key]]):
            holder = opt.slot(p, name)
            holder.assign(arrays.get(name, np.zeros(p.shape, np.float32)))
    opt.step_count = step_count
    # each parameter's own count: one with fewer steps started later, one without state has
    # none yet; without a saved step (torch's SGD) a parameter with state follows the count
    opt._start = {p.state_key: step_count - int(steps.get(p.state_key, step_count if
                  p.state_key in state else 0)) for p in opt.params}
    opt._traced = True
    opt._start_version += 1  # steps compiled with the old offsets retrace
