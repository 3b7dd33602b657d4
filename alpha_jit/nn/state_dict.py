"""state_dict / load_state_dict: checkpoints keyed by PyTorch's parameter names.

A PyTorch model's weights should load into the same architecture written with alpha_jit
(`model.load_state_dict(torch_model.state_dict())`) and back, so names and order follow
`torch.nn.Module.state_dict`: per module its parameters, then its persistent buffers, then each
child under `child.`; a tied weight appears under every name. Loading checks every key and
shape before writing anything, so a failed load leaves the model as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from alpha_jit.errors import AlphaJitError
from alpha_jit.ir import trace
from alpha_jit.tensor import StateTensor

if TYPE_CHECKING:
    from alpha_jit.nn.module import Module


class StateDictError(AlphaJitError, RuntimeError):
    """A state dict that does not fit the model: missing or unexpected keys, wrong shapes.
    A RuntimeError too, as PyTorch's load_state_dict raises, so ported `except` clauses
    still catch it."""


class IncompatibleKeys(NamedTuple):
    """What `load_state_dict(strict=False)` could not match (PyTorch's `_IncompatibleKeys`)."""

    missing_keys: list[str]
    unexpected_keys: list[str]

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return (f"_IncompatibleKeys(missing_keys={self.missing_keys}, "
                f"unexpected_keys={self.unexpected_keys})")

    __str__ = __repr__


def host_array(value: Any) -> np.ndarray:
    """A host numpy array from a numpy array, a StateTensor, a torch tensor (duck-typed: it
    has `.detach()`; floating tensors, bf16 included, come back as float32) or a number."""
    if isinstance(value, StateTensor):
        return value.numpy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        t = value.detach().cpu()
        return t.float().numpy() if t.is_floating_point() else t.numpy()
    return np.asarray(value)


def state_dict(module: Module, destination: dict | None, prefix: str,
               keep_vars: bool) -> dict[str, Any]:
    """`Module.state_dict`: fills `destination` (a new dict if None) and returns it."""
    out: dict[str, Any] = {} if destination is None else destination
    for name, holder in _entries(module, prefix):
        out[name] = holder if keep_vars else holder.numpy()
    return out


def _entries(module: Module, prefix: str) -> list[tuple[str, StateTensor]]:
    """(key, holder) in PyTorch's order, without removing shared modules or tied weights."""
    found = [(prefix + k, p) for k, p in module._parameters.items() if p is not None]
    found += [(prefix + k, b) for k, b in module._buffers.items()
              if b is not None and k not in module._non_persistent_buffers_set]
    for k, m in module._modules.items():
        if m is not None:
            found += _entries(m, f"{prefix}{k}.")
    return found


def load_state_dict(module: Module, source: Any, strict: bool) -> IncompatibleKeys:
    """`Module.load_state_dict`: check everything, then copy with `StateTensor.assign`
    (values are cast to each holder's dtype). Shape mismatches raise even when not strict,
    as in PyTorch; missing and unexpected keys raise only when strict."""
    if trace.active() is not None:
        raise StateDictError("load_state_dict runs between steps, not inside a compiled "
                             "function (a traced step cannot read host arrays)")
    if not hasattr(source, "keys") or not hasattr(source, "__getitem__"):
        raise TypeError(f"expected a dict of name -> array, got {type(source).__name__}")
    expected = dict(_entries(module, ""))
    missing = [k for k in expected if k not in source]
    unexpected = [k for k in source.keys() if k not in expected]
    errors = []
    values: list[tuple[StateTensor, np.ndarray]] = []
    for key, holder in expected.items():
        if key not in source:
            continue
        arr = host_array(source[key])
        if tuple(arr.shape) != tuple(holder.shape):
            errors.append(f"size mismatch for {key}: copying a param with shape "
                          f"{tuple(arr.shape)} from checkpoint, the shape in current model is "
                          f"{tuple(holder.shape)}.")
        values.append((holder, arr))
    if strict:
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: " +
                          ", ".join(f'"{k}"' for k in missing) + ".")
        if unexpected:
            errors.insert(1 if missing else 0, "Unexpected key(s) in state_dict: " +
                          ", ".join(f'"{k}"' for k in unexpected) + ".")
    if errors:
        raise StateDictError(f"Error(s) in loading state_dict for {type(module).__name__}:\n\t"
                             + "\n\t".join(errors))
    for holder, arr in values:
        holder.assign(arr)
    return IncompatibleKeys(missing, unexpected)
