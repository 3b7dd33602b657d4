"""The cyclic garbage collector paused while a step compiles.

Why: tracing, the passes and planning allocate hundreds of thousands of small containers (graph
nodes, their attribute dicts, one graph copy per pass for `dump-ir`) and keep nearly all of
them. Each allocation burst makes CPython run a collection that walks every tracked object
(the model, the graphs so far), only to find almost nothing to free: a fifth of the compile
time of the gpt2 step on the host. Compiling allocates little cyclic garbage, and what it
makes is collected by the first collection after the pause, so pausing costs no memory that
lasts. The collector is switched back on only if it was on (nesting, or a program that turned
it off itself, keep their state); `gc.collect()` still works inside a pause.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic cyclic collection inside the block."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
