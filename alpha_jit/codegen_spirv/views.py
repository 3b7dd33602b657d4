"""Strided views: how a kernel reads a value that layout ops reshaped, transposed or broadcast.

Layout ops never run as kernels. Lowering composes them into a `View` of a materialized buffer
(element offset + per-axis strides); when a composition has no strided form (reshaping a
transposed tensor, say) lowering inserts a copy instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def contiguous_strides(shape: tuple) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


@dataclass(frozen=True)
class View:
    base: int  # id of the materialized value (graph node id, or negative for lowering's copies)
    offset: int  # in elements
    shape: tuple
    strides: tuple

    @staticmethod
    def of(base: int, shape: tuple) -> View:
        return View(base, 0, tuple(shape), contiguous_strides(tuple(shape)))

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    def is_contiguous(self) -> bool:
        dims = [(s, st) for s, st in zip(self.shape, self.strides, strict=True) if s != 1]
        return [st for _, st in dims] == list(contiguous_strides(tuple(s for s, _ in dims)))

    def dense(self) -> bool:
        """Whether the view covers a gap-free block from its offset in some axis order (a
        transpose of a contiguous tensor): an order-free reader (a sum of squares) can read the
        block flat."""
        expected = 1
        for st, s in sorted((st, s) for s, st in zip(self.shape, self.strides, strict=True)
                            if s != 1):
            if st != expected:
                return False
            expected *= s
        return True

    def transpose(self, perm: tuple) -> View:
        return View(self.base, self.offset, tuple(self.shape[p] for p in perm),
                    tuple(self.strides[p] for p in perm))

    def slice(self, starts: tuple, stops: tuple) -> View:
        off = self.offset + sum(a * st for a, st in zip(starts, self.strides, strict=True))
        return View(self.base, off, tuple(b - a for a, b in zip(starts, stops, strict=True)),
                    self.strides)

    def broadcast_to(self, shape: tuple) -> View:
        """numpy broadcasting, right-aligned; broadcast axes get stride 0."""
        lead = len(shape) - len(self.shape)
        strides = [0] * lead
        for i, (s, st) in enumerate(zip(self.shape, self.strides, strict=True)):
            strides.append(0 if s == 1 and shape[lead + i] != 1 else st)
        return View(self.base, self.offset, tuple(shape), tuple(strides))

    def reshape(self, shape: tuple) -> View | None:
        """A strided view with the new shape, or None if the data would have to move."""
        if self.is_contiguous():
            return View(self.base, self.offset, tuple(shape), contiguous_strides(tuple(shape)))
        strides = regroup(self.shape, self.strides, tuple(shape))
        return None if strides is None else View(self.base, self.offset, tuple(shape), strides)

    def collapse_batch(self) -> tuple[int, int] | None:
        """(batch size, single batch stride) if the leading axes (all but the last two)
        can be read as one axis; None if they cannot."""
        bshape, bstrides = self.shape[:-2], self.strides[:-2]
        n = int(np.prod(bshape, dtype=np.int64)) if bshape else 1
        dims = [(s, st) for s, st in zip(bshape, bstrides, strict=True) if s != 1]
        if not dims:
            return n, 0
        if all(st == 0 for _, st in dims):
            return n, 0
        for (_, st0), (s1, st1) in zip(dims, dims[1:], strict=False):
            if st0 != st1 * s1:
                return None
        return n, dims[-1][1]


def regroup(shape: tuple, strides: tuple, new_shape: tuple) -> tuple | None:
    """Strides that read the same elements as (shape, strides) in the row-major order of
    `new_shape` (same element count), or None where no strided form exists."""
    old = [(s, st) for s, st in zip(shape, strides, strict=True) if s != 1]
    out = []
    i = 0
    for t in new_shape:
        if t == 1:
            out.append(0)
            continue
        need, parts = t, []
        while need > 1:
            if i >= len(old):
                return None
            s, st = old[i]
            if need % s == 0:  # the whole old axis goes into this one
                parts.append((s, st))
                need //= s
                i += 1
            elif s % need == 0:  # split the old axis: its outer part goes into this one
                parts.append((need, st * (s // need)))
                old[i] = (s // need, st)
                need = 1
            else:
                return None
        for (_, st0), (s1, st1) in zip(parts, parts[1:], strict=False):
            if st0 != st1 * s1:
                return None
        out.append(parts[-1][1])
    return tuple(out)


def padded_const(shape: tuple, pads: tuple, const: tuple, exprs: list[tuple]) -> tuple:
    """pad(constant) as expressions appended to `exprs`: the constant inside the window, 0
    outside. A padded buffer is read through a window (lowering's `_input_entry`); a constant
    has no read to window, so the window becomes index tests on iota (without them the
    padding would hold the constant too). Returns the expression argument of the result."""
    mask: tuple | None = None
    for d, (b, e) in enumerate(pads):
        if (b, e) == (0, 0):
            continue
        for op, bound in (("ge", b), ("lt", shape[d] - e)):
            exprs.append((op, "f32", (), (("iota", d), ("const", bound, "i32"))))
            test = ("e", len(exprs) - 1)
            if mask is not None:
                exprs.append(("mul", "f32", (), (mask, test)))
                test = ("e", len(exprs) - 1)
            mask = test
    if mask is None:
        return const
    zero = ("const", 0 if const[2] == "i32" else 0.0, const[2])
    exprs.append(("where", const[2], (), (mask, const, zero)))
    return ("e", len(exprs) - 1)
