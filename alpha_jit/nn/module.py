"""Module and Parameter: PyTorch's module tree, whose calls record module paths in traces.

A model definition written for `torch.nn` should port by changing its imports, so `Module`
registers attributes the way PyTorch does: a `Parameter` goes to `_parameters`, a `Module` to
`_modules`, `register_buffer` to `_buffers`; traversal (`named_parameters`, `named_modules`,
...), `state_dict` names, `train()`/`eval()` and `repr` follow from that, with PyTorch's
names and orders. What differs is compilation: reading `module.training` inside a trace
makes the compiled step depend on it (a later `eval()` retraces instead of silently keeping
dropout on), and calling a module inside a trace pushes its path (`blocks.3.attn`) so every
node it records names the layer that made it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from alpha_jit import dtypes, guards
from alpha_jit.ir import trace
from alpha_jit.nn import state_dict as sd
from alpha_jit.tensor import StateTensor, Tensor, full

_DEFAULT_NAMES = ("param", "state")  # a holder still named this gets its attribute's name
_CALLS: list[Module] = []  # modules being called inside the active trace, outermost first
_VIEWS = [0]  # > 0 while a container slice is built: a temporary view renames nothing


@contextmanager
def view_registration() -> Iterator[None]:
    """Build a container that only views modules owned elsewhere (`blocks[1:3]`): their
    provenance names and parameter names stay those of the owning tree."""
    _VIEWS[0] += 1
    try:
        yield
    finally:
        _VIEWS[0] -= 1


class Parameter(guards.GuardedAttrs, StateTensor):
    """Trainable state. `p.grad` is the traced gradient inside a step; after the step, the
    device-resident gradient if the step left one (it did not call `zero_grad()`)."""

    _guarded = frozenset({"requires_grad", "_grad_holder"})  # compiled steps guard on them

    requires_grad = True  # an instance attribute after requires_grad_() (autodiff reads it)

    def __init__(self, data: Any, name: str = "param", requires_grad: bool = True):
        super().__init__(np.asarray(sd.host_array(data), dtype=np.float32), name)
        self._grad_holder: StateTensor | None = None
        if not requires_grad:
            self.requires_grad = False

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

    def requires_grad_(self, requires_grad: bool = True) -> Parameter:
        """Freeze (False) or unfreeze; a compiled step that read this parameter retraces."""
        self.requires_grad = bool(requires_grad)
        return self


_UNSET = object()


class _Structure(guards.GuardedAttrs):
    """A counter of member replacements (a parameter, buffer or child swapped for another
    after construction). Every trace guards on it: a compiled step holds the members it
    read, so any replacement retraces (rare, and logged)."""

    _guarded = frozenset({"version"})
    version = 0


STRUCTURE = _Structure()


def structure_changed() -> None:
    STRUCTURE.version += 1


class Module:
    """Base class of every layer and model: PyTorch's attribute registration and traversal."""

    _name = ""  # the name pushed on the trace's module stack when no caller knows a better one
    _bumps_guards = True  # writes of guarded attributes bump `guards.EPOCH` (__setattr__)

    def __init__(self) -> None:
        # object.__setattr__: our __setattr__ needs these dicts to exist already
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent_buffers_set", set())
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_training", True)
        object.__setattr__(self, "_name", "")

    # ---- training mode -------------------------------------------------------------------
    @property
    def training(self) -> bool:
        """Whether the module is in training mode. Read inside a trace, it becomes a guard of
        the compiled step: after `eval()` the next call retraces with the new value."""
        ctx = trace.active()
        if ctx is not None:
            return ctx.guard(self, "_training")
        return self._training

    @training.setter
    def training(self, mode: bool) -> None:
        ctx = trace.active()
        if ctx is not None:  # set by the traced function itself: the trace does not depend
            ctx.assign_guarded(self, "_training")  # on the value it had before the call
        old = self.__dict__.get("_training")
        object.__setattr__(self, "_training", bool(mode))
        if old is not bool(mode):  # compiled steps that read `training` re-check it
            guards.bump()

    def train(self, mode: bool = True) -> Module:
        """Set training mode on this module and every descendant; returns self."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for m in self.children():
            m.train(mode)
        return self

    def eval(self) -> Module:
        """`train(False)`: Dropout becomes identity (compiled steps that read it retrace)."""
        return self.train(False)

    # ---- registration --------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        params = self.__dict__.get("_parameters")
        if isinstance(value, Parameter):
            if params is None:
                raise AttributeError("cannot assign parameters before Module.__init__() call")
            if params.get(name, value) is not value:
                structure_changed()
            self._forget(name, keep=self._parameters)  # a replacement keeps its place
            self.register_parameter(name, value)
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(f"cannot assign '{type(value).__name__}' as parameter '{name}' "
                                "(nn.Parameter or None expected)")
            structure_changed()
            params[name] = None
        elif isinstance(value, Module):
            if params is None:
                raise AttributeError("cannot assign module before Module.__init__() call")
            self._forget(name, keep=self._modules)
            self._add(name, value)
            self.name_parameters()
        elif params is not None and name in self._modules:
            if value is not None:
                raise TypeError(f"cannot assign '{type(value).__name__}' as child module "
                                f"'{name}' (nn.Module or None expected)")
            structure_changed()
            self._modules[name] = None
        elif params is not None and name in self._buffers:
            self._set_buffer(name, value)
        elif name in guards.TRACKED:  # e.g. `_training` set directly: compiled steps re-check
            old = self.__dict__.get(name, _UNSET)
            object.__setattr__(self, name, value)
            if not guards.same(value, old):
                guards.bump()
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: registered members live in the three dicts
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            members = d.get(store)
            if members is not None and name in members:
                return members[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name: str) -> None:
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                structure_changed()
                del store[name]
                self._non_persistent_buffers_set.discard(name)
                return
        object.__delattr__(self, name)
        if name in guards.TRACKED:
            guards.bump()

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self._parameters, *self._buffers, *self._modules})

    def _forget(self, name: str, keep: dict | None = None) -> None:
        """Drop `name` from every store but `keep` before it is registered there (where an
        existing entry is replaced in place: PyTorch keeps a replaced member's position, and
        a Sequential's order is its forward order)."""
        self.__dict__.pop(name, None)
        for store in (self._parameters, self._buffers, self._modules):
            if store is not keep:
                store.pop(name, None)
        self._non_persistent_buffers_set.discard(name)

    def _check_new_name(self, name: Any, kind: str, store: dict) -> None:
        if not isinstance(name, str):
            raise TypeError(f"{kind} name should be a string, got {type(name).__name__}")
        if not name:
            raise KeyError(f'{kind} name can\'t be empty string ""')
        if "." in name:
            raise KeyError(f'{kind} name can\'t contain ".", got: {name}')
        if name not in store and (name in self.__dict__ or hasattr(type(self), name)
                                  or any(name in s for s in (self._parameters, self._buffers,
                                                             self._modules))):
            raise KeyError(f"attribute '{name}' already exists")

    def _add(self, name: str, module: Module | None) -> None:
        """Register a child without renaming the tree (containers add many, then name once)."""
        if self._modules.get(name, module) is not module:
            structure_changed()
        self._modules[name] = module
        if module is not None and not _VIEWS[0]:
            object.__setattr__(module, "_name", name)

    def add_module(self, name: str, module: Module | None) -> None:
        """Register `module` as the child `name` (what `self.name = module` does)."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        self._check_new_name(name, "module", self._modules)
        self._add(name, module)
        self.name_parameters()

    register_module = add_module

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register `param` (or None: a slot that state_dict skips, as an absent bias)."""
        if "_parameters" not in self.__dict__:
            raise AttributeError("cannot assign parameter before Module.__init__() call")
        self._check_new_name(name, "parameter", self._parameters)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot assign '{type(param).__name__}' object to parameter "
                            f"'{name}' (nn.Parameter or None required)")
        if param is not None and param.state_name in _DEFAULT_NAMES:
            param.state_name = name
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Any, persistent: bool = True) -> None:
        """Register state that is not trained (running statistics, masks, RoPE tables): a
        numpy array, a StateTensor or a torch tensor, kept as a StateTensor on the device.
        Non-persistent buffers stay out of `state_dict`."""
        if "_buffers" not in self.__dict__:
            raise AttributeError("cannot assign buffer before Module.__init__() call")
        self._check_new_name(name, "buffer", self._buffers)
        self._buffers[name] = None
        self._set_buffer(name, tensor)
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    def _set_buffer(self, name: str, value: Any) -> None:
        old = self._buffers.get(name)
        if value is None or isinstance(value, StateTensor):
            if old is not None and old is not value:
                structure_changed()
            self._buffers[name] = value
        elif isinstance(value, Tensor):  # `self.buf = new` inside a step: a state write
            if old is None:
                raise TypeError(f"buffer '{name}' is None; register a value before a compiled "
                                "step writes it")
            old.assign(value)
            return
        else:
            arr = sd.host_array(value)
            mask = arr.dtype == bool
            if mask:  # masks are f32 1.0 / 0.0 here; marked so attention keeps, not adds, them
                arr = arr.astype("float32")
            if old is not None and old.shape == arr.shape and old.dtype == dtypes.from_numpy(arr):
                old.assign(arr)  # in place: compiled steps that read the buffer see the change
            else:
                if old is not None:
                    structure_changed()
                self._buffers[name] = StateTensor(arr, name)
                self._buffers[name].is_mask = mask
        new = self._buffers[name]
        if new is not None and new.state_name in _DEFAULT_NAMES:
            new.state_name = name

    # ---- traversal -----------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        seen: set[int] = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, memo: set[int] | None = None, prefix: str = "",
                      remove_duplicate: bool = True) -> Iterator[tuple[str, Module]]:
        """(path, module) for this module and every descendant, pre-order; a module reached
        twice appears once unless `remove_duplicate` is False."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        if remove_duplicate:
            memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(memo, f"{prefix}.{name}" if prefix else name,
                                           remove_duplicate)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def _named_members(self, store: str, prefix: str, recurse: bool,
                       remove_duplicate: bool) -> Iterator[tuple[str, Any]]:
        seen: set[int] = set()
        mods = (self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
                if recurse else iter([(prefix, self)]))
        for path, m in mods:
            for k, v in getattr(m, store).items():
                if v is None or id(v) in seen:
                    continue
                if remove_duplicate:  # tied weights appear once, under their first name
                    seen.add(id(v))
                yield (f"{path}.{k}" if path else k), v

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        yield from self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True) -> list[Parameter]:
        """A list, not PyTorch's generator: it can be iterated more than once."""
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, StateTensor]]:
        yield from self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True) -> Iterator[StateTensor]:
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def get_submodule(self, target: str) -> Module:
        """The descendant at dotted path `target` ("" is self)."""
        m: Module = self
        for part in target.split(".") if target else []:
            child = m._modules.get(part)
            if child is None:
                raise AttributeError(f"{type(m).__name__} has no submodule `{part}` "
                                     f"(looking up `{target}`)")
            m = child
        return m

    def name_parameters(self) -> None:
        """Give every parameter and buffer its full dotted name (errors, dumps, optimizer
        moments). Registering a child does this for the parent's tree, so a model built
        bottom-up ends with root-relative names."""
        if _VIEWS[0]:
            return
        for name, t in (*self.named_parameters(), *self.named_buffers()):
            t.state_name = name

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        """Call `fn` on every descendant, then on self (PyTorch's order); returns self."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # ---- gradients -----------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient (inside a step: the traced one; outside: the
        kept one). `set_to_none=False` keeps existing gradients as zeros."""
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            elif trace.active() is not None:
                if p.grad is not None:
                    p.grad = full(p.shape, 0.0)
            elif p._grad_holder is not None:
                p._grad_holder.assign(np.zeros(p.shape, np.float32))

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Freeze (False) or unfreeze every parameter; compiled steps retrace on the change."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self, *, destination: dict | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """name -> numpy array of every parameter and persistent buffer, PyTorch's names and
        order (tied weights under each name); `keep_vars` gives the holders themselves."""
        return sd.state_dict(self, destination, prefix, keep_vars)

    def load_state_dict(self, state_dict: Any, strict: bool = True,
                        assign: bool = False) -> sd.IncompatibleKeys:
        """Copy numpy arrays or torch tensors into the parameters and buffers; nothing is
        written unless every key and shape checks out. `assign` is accepted for PyTorch's
        signature (values are always copied into the existing holders)."""
        return sd.load_state_dict(self, state_dict, strict)

    # ---- calling -----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kw: Any) -> Any:
        ctx = trace.active()
        if ctx is None:
            return self.forward(*args, **kw)
        ctx.guard(STRUCTURE, "version")  # a member replaced after compiling retraces
        name = self._call_name()
        _CALLS.append(self)
        try:
            if not name:  # the root module adds no path component
                return self.forward(*args, **kw)
            with ctx.in_module(name):
                return self.forward(*args, **kw)
        finally:
            _CALLS.pop()

    def _call_name(self) -> str:
        """This module's path relative to the module calling it, so a block called from
        GPT.forward through a ModuleList records `blocks.3`; a module called from outside any
        module uses the name it was registered under."""
        if _CALLS and _CALLS[-1] is not self:
            for path, m in _CALLS[-1].named_modules():
                if m is self:
                    return path
        return self._name

    def forward(self, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    # ---- printing --------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The text inside `Name(...)` before the children; layers override it."""
        return ""

    def _get_name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        # PyTorch's layout exactly, so printed models compare line for line
        extra = self.extra_repr()
        extra_lines = extra.split("\n") if extra else []
        child_lines = [f"({k}): {_addindent(repr(m), 2)}" for k, m in self._modules.items()]
        lines = extra_lines + child_lines
        out = self._get_name() + "("
        if lines:
            if len(extra_lines) == 1 and not child_lines:
                out += extra_lines[0]
            else:
                out += "\n  " + "\n  ".join(lines) + "\n"
        return out + ")"


def _addindent(text: str, spaces: int) -> str:
    """Indent every line but the first (PyTorch's nesting of child reprs)."""
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    rest = [(" " * spaces) + line if line.strip() else "" for line in lines[1:]]
    return lines[0] + "\n" + "\n".join(rest)
