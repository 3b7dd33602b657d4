"""Sequential, ModuleList, ModuleDict: PyTorch's containers, with PyTorch's child names.

A list or dict of layers must register its members (so their parameters train, load and
save as `blocks.3.attn.q.weight`) and must index like the Python type it stands for. Members
are named "0", "1", ... (a Sequential built from an OrderedDict keeps its keys), which makes
`state_dict` keys identical to PyTorch's for the same architecture. A member called from
the module that owns the container records its full path (`blocks.3`) in provenance; see
`Module._call_name`.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from alpha_jit.nn.module import Module, _addindent, structure_changed, view_registration


def _check_module(value: Any, where: str) -> Module:
    if not isinstance(value, Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(value).__name__}")
    return value


class _IndexedModules(Module):
    """Shared by Sequential and ModuleList: members keyed by position."""

    def _index(self, idx: Any) -> int:
        """A non-negative position from an int (negative counts from the end)."""
        i = operator.index(idx)
        n = len(self._modules)
        if not -n <= i < n:
            raise IndexError(f"index {idx} is out of range for {type(self).__name__} of "
                             f"length {n}")
        return i % n

    def _renumber(self, members: Iterable[Module]) -> None:
        """Replace the members by `members`, named 0..n-1 (after a delete or insert)."""
        structure_changed()
        object.__setattr__(self, "_modules", {})
        for i, m in enumerate(members):
            self._add(str(i), m)
        self.name_parameters()

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __setitem__(self, idx: int, module: Module) -> None:
        key = list(self._modules)[self._index(idx)]
        setattr(self, key, _check_module(module, f"{type(self).__name__}[{idx}] ="))

    def __delitem__(self, idx: int | slice) -> None:
        keys = list(self._modules)
        gone = set(keys[idx]) if isinstance(idx, slice) else {keys[self._index(idx)]}
        self._renumber(m for k, m in self._modules.items() if k not in gone)

    def append(self, module: Module) -> Any:
        """Add `module` at the end; returns self."""
        self.add_module(str(len(self)), _check_module(module, f"{type(self).__name__}.append"))
        return self

    def extend(self, modules: Iterable[Module]) -> Any:
        """Add every module of `modules` at the end; returns self."""
        start = len(self)
        for i, m in enumerate(modules):
            self._add(str(start + i), _check_module(m, f"{type(self).__name__}.extend"))
        self.name_parameters()
        return self

    def insert(self, index: int, module: Module) -> Any:
        """Put `module` before position `index` (later members move up one)."""
        members = list(self._modules.values())
        n = len(members)
        if not -n <= index <= n:
            raise IndexError(f"insert index {index} is out of range for length {n}")
        members.insert(index % (n + 1) if index < 0 else index,
                       _check_module(module, f"{type(self).__name__}.insert"))
        self._renumber(members)
        return self

    def pop(self, idx: int = -1) -> Module:
        m = self[idx]
        del self[idx]
        return m


class Sequential(_IndexedModules):
    """Calls its members in order, each on the previous one's output.

    `Sequential(a, b, c)` names them "0", "1", "2"; `Sequential(OrderedDict(name=module))`
    keeps the names. `seq[i]` (negative too) is a member and `seq[1:]` a Sequential of the
    same members under the same names, as in PyTorch."""

    def __init__(self, *args: Any):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for key, m in args[0].items():
                self._check_new_name(key, "module", self._modules)
                self._add(key, _check_module(m, f"Sequential entry {key!r}"))
        else:
            for i, m in enumerate(args):
                self._add(str(i), _check_module(m, f"Sequential argument {i}"))
        self.name_parameters()

    def __getitem__(self, idx: int | slice) -> Any:
        if isinstance(idx, slice):
            with view_registration():
                return type(self)(OrderedDict(list(self._modules.items())[idx]))
        return list(self._modules.values())[self._index(idx)]

    @property
    def layers(self) -> list[Module]:
        """The members as a list (this Sequential's older interface; prefer `seq[i]`)."""
        return list(self._modules.values())

    def forward(self, x: Any) -> Any:
        for m in self._modules.values():
            x = m(x)
        return x


class ModuleList(_IndexedModules):
    """A list of modules whose parameters are registered (named "0", "1", ...).

    Not callable itself: iterate it (`for blk in self.blocks: x = blk(x)`)."""

    def __init__(self, modules: Iterable[Module] | None = None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def __getitem__(self, idx: int | slice) -> Any:
        if isinstance(idx, slice):
            with view_registration():
                return type(self)(list(self._modules.values())[idx])
        return self._modules[str(self._index(idx))]

    def __iadd__(self, modules: Iterable[Module]) -> ModuleList:
        return self.extend(modules)

    def __add__(self, other: Iterable[Module]) -> ModuleList:
        return ModuleList([*self, *other])

    def __repr__(self) -> str:
        # PyTorch folds runs of identical members: "(0-11): 12 x Block(...)"
        reprs = [repr(m) for m in self]
        if not reprs:
            return self._get_name() + "()"
        runs: list[list[Any]] = []  # [first index, last index, repr]
        for i, r in enumerate(reprs):
            if runs and runs[-1][2] == r:
                runs[-1][1] = i
            else:
                runs.append([i, i, r])
        lines = []
        for a, b, r in runs:
            line = f"({a}): {r}" if a == b else f"({a}-{b}): {b - a + 1} x {r}"
            lines.append(_addindent(line, 2))
        return self._get_name() + "(\n  " + "\n  ".join(lines) + "\n)"

    def forward(self, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError("ModuleList is not callable: iterate over it and call its "
                                  "members (or use nn.Sequential)")


class ModuleDict(Module):
    """A dict of modules whose parameters are registered under their keys (insertion order)."""

    def __init__(self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]] | None
                 = None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        self.add_module(key, _check_module(module, f"ModuleDict[{key!r}] ="))

    def __delitem__(self, key: str) -> None:
        structure_changed()
        del self._modules[key]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def keys(self) -> Iterable[str]:
        return self._modules.keys()

    def items(self) -> Iterable[tuple[str, Module]]:
        return self._modules.items()

    def values(self) -> Iterable[Module]:
        return self._modules.values()

    def clear(self) -> None:
        self._modules.clear()

    def pop(self, key: str) -> Module:
        m = self[key]
        del self[key]
        return m

    def update(self, modules: Mapping[str, Module] | Iterable[tuple[str, Module]]) -> None:
        """Add or replace entries from a mapping or an iterable of (key, module) pairs."""
        pairs = modules.items() if isinstance(modules, Mapping) else modules
        for j, pair in enumerate(pairs):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"ModuleDict.update: element #{j} should be a (key, module) "
                                f"pair, got {type(pair).__name__}")
            key, m = pair
            self._check_new_name(key, "module", self._modules)
            self._add(key, _check_module(m, f"ModuleDict entry {key!r}"))
        self.name_parameters()

    def forward(self, *args: Any, **kw: Any) -> Any:
        raise NotImplementedError("ModuleDict is not callable: call its members")

