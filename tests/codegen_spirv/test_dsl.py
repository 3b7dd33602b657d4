"""The kernel DSL: every construct produces modules that pass spirv-val, on every caps mix;
loop bounds add up to the per-invocation bound that guards llvmpipe's loop limit."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit.codegen_spirv.dsl import KernelBuilder
from alpha_jit.codegen_spirv.kernel import Dispatch, KernelSpec
from alpha_jit.codegen_spirv.loop_budget import CPU_LOOP_BUDGET

from .conftest import validate


class Caps:
    def __init__(self, storage16: bool, float16: bool):
        self.storage_buffer_16bit = storage16
        self.float16 = float16


def vadd(caps=None) -> KernelBuilder:
    kb = KernelBuilder("vadd", 256, caps)
    a = kb.buffer("a", "f32", writable=False)
    b = kb.buffer("b", "f32", writable=False)
    out = kb.buffer("out", "f32", writable=True)
    pc = kb.push_constants([("count", "u32")])
    i = kb.global_id(0)
    with kb.if_(i < pc["count"]):
        out.store(i, a.load(i) + b.load(i))
    return kb


def test_vadd_validates():
    kb = vadd()
    validate(kb.finish(), "vadd")
    assert [b.name for b in kb.bindings] == ["a", "b", "out"]
    assert kb.push_constant_size == 4


@pytest.mark.parametrize("caps", [None, Caps(True, True), Caps(True, False), Caps(False, False)])
def test_all_constructs_validate(caps):
    kb = KernelBuilder("everything", (64, 1, 1), caps)
    a = kb.buffer("a", "f32", writable=False)
    bf = kb.buffer("bf", "bf16", writable=True)
    ii = kb.buffer("ii", "i32", writable=True)
    if kb.storage16:
        h = kb.buffer("h", "f16", writable=True)
    pc = kb.push_constants([("n", "u32"), ("scale", "f32"), ("k", "i32")])
    gid = kb.global_id(0)
    sh = kb.shared("f32", 64)
    acc = kb.var("f32", 0.0)
    flag = kb.var("bool", False)
    with kb.if_(gid < pc["n"]):
        x = a.load(gid) * pc["scale"]
        y = kb.tanh(x) + kb.exp(x) - kb.log(kb.abs(x) + 1.0) + kb.sqrt(kb.abs(x))
        y = kb.fmax(y, kb.inversesqrt(kb.abs(x) + 1.0)) / 3.0 % 7.0
        y = kb.select(x > 0.0, y, -y) + kb.pow(kb.abs(x), 0.5) + kb.floor(x) + (x // 2.0)
        with kb.loop(pc["k"], 0, -1, max_trips=10) as j:
            acc.set(acc.get() + kb.cast(j, "f32"))
        with kb.loop(kb.cast(gid, "i32"), 100, kb.cast(kb.num_workgroups(0), "i32"),
                     max_trips=100) as j:
            flag.set(flag.get() | (j == 7))
        with kb.if_else(flag.get() & (x != x)) as (then, orelse):
            with then:
                bf.store(gid, y)
            with orelse:
                bf.store(gid, bf.load(gid) + y)
        iv = kb.cast(y, "i32")
        ii.store(gid, (iv // 3) + (iv % 5) + (iv << 1) + (iv >> 1) + (iv & 3) + (iv | 1)
                 + kb.cast(x > 0.5, "i32") - kb.abs(iv) + kb.fmin(iv, 2))
        if kb.storage16:
            h.store(gid, h.load(gid) + acc.get())
    sh.store(kb.local_id(0), acc.get())
    kb.barrier()
    s = kb.subgroup_reduce("add", sh.load(kb.subgroup_invocation_id()))
    m = kb.subgroup_reduce("max", kb.cast(kb.subgroup_id(), "i32"))
    with kb.if_(kb.local_index() == 0):
        a_out = kb.cast(m, "f32") + s + kb.cast(kb.num_subgroups() + kb.subgroup_size()
                                                + kb.workgroup_id(0), "f32")
        bf.store(0, a_out)
    validate(kb.finish(), "everything")
    assert kb.shared_bytes == 256


def test_value_type_errors():
    kb = KernelBuilder("errs")
    x = kb.f32(1.0)
    with pytest.raises(TypeError, match="mismatch"):
        _ = x + kb.i32(1)
    with pytest.raises(TypeError, match="truth"):
        bool(x < 2.0)


def test_memoised_constants_keep_negative_zero_and_types_apart():
    kb = KernelBuilder("consts")
    assert kb.f32(0.0).id == kb.f32(0).id != kb.f32(-0.0).id  # equal in Python, not in bits
    assert kb.f32(1.0).id != kb.i32(1).id != kb.u32(1).id
    assert kb.f32(float("nan")).id == kb.f32(float("nan")).id  # deduplicated by the builder
    assert kb.type("f32") == kb.type("f32") != kb.type("f16")


# ---- loop bounds (llvmpipe's loop limit) ------------------------------------------------------
CPU = SimpleNamespace(device_type="cpu")


def _passes(body, caps=None) -> int:
    kb = KernelBuilder("bounds", 64, caps)
    body(kb, kb.push_constants([("n", "i32")])["n"])
    return kb.loops.passes


def test_loop_bounds_add_up_per_invocation():
    """A loop entered once with t trips costs t + 1 passes; nested loops multiply by the
    enclosing trips; loops in both arms of a branch count (as if taken)."""
    def seq(kb, n):
        with kb.loop(0, 10):
            pass
        with kb.loop(3, 10, 2):  # 3, 5, 7, 9
            pass
    assert _passes(seq) == 11 + 5

    def nested(kb, n):
        with kb.loop(0, 10), kb.loop(0, 5):
            with kb.loop(kb.local_id(0), 64, 16):  # a Value start counts as 0: 4 trips
                pass
    assert _passes(nested) == 11 + 10 * 6 + 50 * 5

    def bounded(kb, n):
        with kb.loop(0, n, max_trips=7):  # a runtime stop: the caller's bound
            pass
        with kb.loop(0, 1000, max_trips=3):  # max_trips also caps a computable bound
            pass
        with kb.loop(kb.u32(0), kb.u32(9)):  # constant Values are known
            pass
        with kb.loop(10, 0, -3):  # 10, 7, 4, 1
            pass
    assert _passes(bounded) == 8 + 4 + 10 + 5

    def branches(kb, n):
        with kb.if_else(n > 3) as (then, orelse):
            with then, kb.loop(0, 100):
                pass
            with orelse, kb.loop(0, 50):
                pass
    assert _passes(branches) == 101 + 51


@pytest.mark.parametrize("args,why", [
    (lambda kb, n: (0, n), "max_trips"),  # runtime stop
    (lambda kb, n: (0, 100, n), "max_trips"),  # runtime step
    (lambda kb, n: (n, 0, -1), "max_trips"),  # counting down from a runtime start
    (lambda kb, n: (-1, 10), ">= 0"),
    (lambda kb, n: (0, 10, 0), "never ends"),
])
def test_a_loop_without_a_bound_is_a_generation_error(args, why):
    kb = KernelBuilder("unbounded", 64)
    n = kb.push_constants([("n", "i32")])["n"]
    with pytest.raises(ValueError, match=why), kb.loop(*args(kb, n)):
        pass


def _two_loops(caps, n1: int, n2: int, name: str):
    """out = (n1, n2): two loops in a row counting their trips (not unrollable: 32-bit)."""
    kb = KernelBuilder(name, 1, caps)
    out = kb.buffer("out", "i32", writable=True)
    c1, c2 = kb.var("i32", 0), kb.var("i32", 0)
    with kb.loop(0, n1):
        c1.set(c1.get() + 1)
    with kb.loop(0, n2):
        c2.set(c2.get() + 1)
    out.store(0, c1.get())
    out.store(1, c2.get())
    return kb.binary(KernelSpec("loops", name, ((n1, n2),)), [Dispatch((1, 1, 1))])


def test_cpu_kernel_over_the_loop_budget_carries_a_problem():
    fits = _two_loops(CPU, 32766, 32766, "fits")  # 32767 + 32767 passes = 65534
    over = _two_loops(CPU, 32766, 32767, "over")  # 65535: llvmpipe's counter reaches 0
    assert fits.notes["loop_passes"] == CPU_LOOP_BUDGET - 1 and "problem" not in fits.notes
    assert over.notes["loop_passes"] == CPU_LOOP_BUDGET
    assert over.notes["problem"].startswith("over may make up to 65535 loop passes")
    assert "after 65535 in all" in over.notes["problem"]
    gpu = _two_loops(SimpleNamespace(device_type="discrete"), 32766, 32767, "gpu")
    assert "problem" not in gpu.notes and gpu.words == over.words  # bookkeeping only


def test_the_loop_budget_model_matches_the_device(run_kernel):
    """What the bound assumes of llvmpipe (t + 1 passes per loop entry, nested trips
    multiplied, 65535 in all), on the device: a kernel just within the budget runs whole."""
    (out,) = run_kernel(_two_loops(CPU, 32766, 32766, "edge"), [], [((2,), np.int32)])
    assert out.tolist() == [32766, 32766]
    kb = KernelBuilder("nested_edge", 1, CPU)
    buf = kb.buffer("out", "i32", writable=True)
    c = kb.var("i32", 0)
    with kb.loop(0, 216), kb.loop(0, 300):  # 217 + 216 * 301 = 65233 passes
        c.set(c.get() + 1)
    buf.store(0, c.get())
    b = kb.binary(KernelSpec("loops", "nested_edge", ()), [Dispatch((1, 1, 1))])
    assert "problem" not in b.notes
    (out,) = run_kernel(b, [], [((1,), np.int32)])
    assert out[0] == 216 * 300
