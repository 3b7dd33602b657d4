"""Guards: the Python state a compiled step depends on, checked on every call in O(1).

Why: a trace reads Python state that is not an input: a module's `training` flag, each
parameter's `requires_grad`, whether it keeps a `.grad`, the optimizer's per-parameter step
offsets, the module structure. A compiled step is only valid while all of that is unchanged,
so every call must check it, and a GPT-2 step reads about 420 such values. Checking them all
cost 13-60 us per call on a small CPU, which is the whole host budget of a replayed step.

So every change of a guardable attribute goes through `GuardedAttrs.__setattr__` (or calls
`bump()`), which advances one global epoch. A guard set that held at epoch E still holds at
E: the per-call check is one integer comparison, and only a call after some write (a
`model.eval()`, a `requires_grad_`, a `zero_grad` that drops a kept gradient) re-reads the
values, with one C-level map per attribute name.

Attributes outside `TRACKED` may be guarded too; such a guard set is checked in full on
every call (correct, only slower), so a new guard is never silently skipped.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# attributes whose every change bumps the epoch (see GuardedAttrs and its users)
TRACKED = frozenset({"_training", "requires_grad", "_grad_holder", "version", "_start_version"})


class _Epoch:
    value = 0


EPOCH = _Epoch()
# unique epochs even from racing threads (`+= 1` is not atomic): a value is never reused
_COUNTER = itertools.count(1)


def bump() -> None:
    """A guardable value changed: every guard set re-reads its values at its next check.
    Call it after the write, so a check between the two cannot cache the old value."""
    EPOCH.value = next(_COUNTER)


class _GuardedMeta(type):
    """Class-level writes (`Parameter.requires_grad = False`) change every instance that has
    no value of its own: they bump too."""

    def __setattr__(cls, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in getattr(cls, "_guarded", ()):
            bump()

    def __delattr__(cls, name: str) -> None:
        super().__delattr__(name)
        if name in getattr(cls, "_guarded", ()):
            bump()


class GuardedAttrs(metaclass=_GuardedMeta):
    """Mixin: changing or deleting one of the class's `_guarded` attributes bumps the epoch.
    Writes through `vars(obj)` or `object.__setattr__` are not seen (not supported)."""

    _guarded: frozenset[str] = frozenset()
    _bumps_guards = True  # GuardSet trusts the epoch only for objects that bump it

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._guarded:
            old = getattr(self, name, _MISSING)
            object.__setattr__(self, name, value)
            if not same(value, old):  # `model.train()` every iteration changes nothing
                bump()
            return
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        if name in self._guarded:
            bump()


_MISSING = object()


def same(now: Any, then: Any) -> bool:
    """A guarded value is unchanged: equal for plain values, the same object otherwise (a
    replaced parameter; `==` on tensors would build an op)."""
    if isinstance(then, bool | int | float | str | type(None)):
        return type(now) is type(then) and now == then
    return now is then


@dataclass(frozen=True)
class _Check:
    """One attribute name over many objects: read(objs) must equal want."""

    read: Callable[[tuple], Iterable[Any]]
    objs: tuple
    want: tuple


class GuardSet:
    """The guards of one trace: (object, attribute, value read) and (parameter, whether it had
    a kept gradient). `holds()` is what every call of the compiled step checks."""

    def __init__(self, guards: list[tuple[Any, str, Any]],
                 grad_guard: list[tuple[Any, bool]]):
        self.guards, self.grad_guard = guards, grad_guard
        self.checks = _grouped(guards, grad_guard)
        # only tracked attributes of objects whose class bumps may trust the epoch
        self.epoch_ok = all(a in TRACKED and getattr(type(o), "_bumps_guards", False)
                            for o, a, _ in guards) and \
            all(getattr(type(p), "_bumps_guards", False) for p, _ in grad_guard)
        self._at = -1  # the epoch of the last full check, and its result
        self._result = False

    def holds(self) -> bool:
        epoch = EPOCH.value
        if self._at == epoch:  # nothing guardable changed since: same answer, held or not
            return self._result
        try:
            ok = all(tuple(c.read(c.objs)) == c.want for c in self.checks)
        except AttributeError:  # an attribute that vanished: changed
            ok = False
        if self.epoch_ok:
            self._at, self._result = epoch, ok
        return ok

    def change(self) -> str:
        """Why `holds()` is False, for the retrace log."""
        for o, a, v in self.guards:
            if not same(getattr(o, a, _MISSING), v):
                name = getattr(o, "state_name", None) or getattr(o, "_name", "") or \
                    type(o).__name__
                return f"{name}.{a} changed from {v!r} to {getattr(o, a, None)!r}"
        return "a parameter's kept .grad appeared or was cleared"


def _grouped(guards: list[tuple[Any, str, Any]],
             grad_guard: list[tuple[Any, bool]]) -> list[_Check]:
    """One check per guarded attribute name, plus one for the kept-gradient guard (holder
    present or not): each a map that runs in C."""
    by_attr: dict[str, tuple[list, list]] = {}
    for o, a, v in guards:
        objs, want = by_attr.setdefault(a, ([], []))
        objs.append(o)
        want.append(v)
    checks = [_Check(lambda os, g=operator.attrgetter(a): map(g, os), tuple(objs), tuple(want))
              for a, (objs, want) in by_attr.items()]
    if grad_guard:
        holder = operator.attrgetter("_grad_holder")
        checks.append(_Check(
            lambda ps: map(operator.is_not, map(holder, ps), itertools.repeat(None)),
            tuple(p for p, _ in grad_guard), tuple(h for _, h in grad_guard)))
    return checks
