"""Guards: the Python state a compiled step depends on, checked on every call in O(1).

Why: a trace reads Python state that is not an input: a module's `training` flag, each
parameter's `requires_grad`, whether it keeps a `.grad`, the optimizer's per-parameter step
offsets, the module structure. A compiled step is only valid while all of that is unchanged,
so every call must check it, and a GPT-2 step reads about 420 such values. Checking them all
cost 13-60 us per call on a small CPU, which is the whole host budget of a replayed step.

So every write of a guardable attribute goes through `GuardedAttrs.__setattr__` (or calls
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

# attributes whose every write bumps the epoch (see GuardedAttrs and its users)
TRACKED = frozenset({"_training", "requires_grad", "_grad_holder", "version", "_start_version"})


class _Epoch:
    value = 0


EPOCH = _Epoch()


def bump() -> None:
    """A guardable value changed: every guard set re-reads its values at its next check."""
    EPOCH.value += 1


class GuardedAttrs:
    """Mixin: assigning one of the class's `_guarded` attributes bumps the epoch."""

    _guarded: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._guarded:
            EPOCH.value += 1
        object.__setattr__(self, name, value)


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
        # only a set made of tracked attributes may trust the epoch
        self.epoch_ok = all(a in TRACKED for _, a, _ in guards)
        self._held_at = -1  # the epoch at which every guard last held

    def holds(self) -> bool:
        if self._held_at == EPOCH.value:
            return True
        epoch = EPOCH.value
        try:
            ok = all(tuple(c.read(c.objs)) == c.want for c in self.checks)
        except AttributeError:  # an attribute that vanished: changed
            return False
        if ok and self.epoch_ok:
            self._held_at = epoch
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
