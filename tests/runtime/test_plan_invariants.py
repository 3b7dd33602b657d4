"""The memory plan and the barriers are sound on a whole training step, without a device.

`plan_memory` walks each pool's placed values in address order and `plan_barriers` compares a
kernel's ranges only with pending ranges in the same memory (both for compile time); these
check what the plan promises: values live at once never share bytes, no pool passes its limit,
and a kernel that touches bytes an earlier kernel wrote (or writes bytes one read) waits for it.
"""

from __future__ import annotations

import numpy as np
import pytest

from alpha_jit.codegen_spirv.lower import lower
from alpha_jit.nn.transformer import GPT, GPTConfig
from alpha_jit.runtime.plan import plan_barriers, plan_memory
from benchmarks import training


@pytest.fixture(scope="module")
def lowered():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    x = np.zeros((2, 16), np.int32)
    return lower(training.alpha_step(model, "f32").trace(x, x).graph)


@pytest.mark.parametrize("limit", [None, 1 << 16, 1 << 20])
def test_values_live_at_once_never_share_bytes(lowered, limit):
    mem = plan_memory(lowered, 256, limit)
    size = {b: lowered.buffers[b].nbytes for b in mem.offsets}
    if limit is not None:  # a pool over the limit holds one value that is over it alone
        for pool, nbytes in enumerate(mem.pool_bytes):
            held = [b for b in mem.offsets if mem.pool_of[b] == pool]
            assert nbytes <= limit or all(size[b] > limit for b in held), pool
    assert mem.arena_bytes < mem.naive_bytes  # reuse happened
    by_pool: dict[int, list[int]] = {}
    for b in mem.offsets:
        assert mem.offsets[b] % 256 == 0
        by_pool.setdefault(mem.pool_of[b], []).append(b)
    for bufs in by_pool.values():
        bufs.sort(key=mem.offsets.__getitem__)
        for i, a in enumerate(bufs):
            for b in bufs[i + 1:]:
                if mem.offsets[b] >= mem.offsets[a] + size[a]:
                    break  # sorted by address: nothing later overlaps a either
                (s1, e1), (s2, e2) = mem.intervals[a], mem.intervals[b]
                shared = _inplace(lowered, a, b)
                assert e1 < s2 or e2 < s1 or shared, (a, b)


def _inplace(lowered, a: int, b: int) -> bool:
    """A kernel's in-place pair may share memory (the read dies where the write is born)."""
    return any({a, b} == {r, w} for k in lowered.kernels for r, w in k.inplace)


def test_every_hazard_has_a_barrier_between(lowered):
    mem = plan_memory(lowered, 256, 1 << 20)
    barrier = plan_barriers(lowered, mem)
    assert plan_barriers(lowered, mem, "all") == [True] * len(lowered.kernels)
    assert not all(barrier[1:])  # independent kernels run without one

    def ranges(ids):
        for b in ids:
            if b in mem.offsets:
                o = mem.offsets[b]
                yield ("pool", mem.pool_of[b]), o, o + lowered.buffers[b].nbytes
            else:
                yield b, 0, 1

    def touch(x, y):
        return x[0] == y[0] and x[1] < y[2] and y[1] < x[2]

    kernels = lowered.kernels
    for j, kj in enumerate(kernels):
        reads, writes = list(ranges(kj.reads)), list(ranges(kj.writes))
        for i in range(j - 1, -1, -1):
            if barrier[i + 1]:
                break  # kernel j already waits for everything up to i
            ki = kernels[i]
            wi, ri = list(ranges(ki.writes)), list(ranges(ki.reads))
            assert not any(touch(x, y) for x in reads + writes for y in wi), (i, j)
            assert not any(touch(x, y) for x in writes for y in ri), (i, j)
