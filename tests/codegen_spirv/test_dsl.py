"""The kernel DSL: every construct produces modules that pass spirv-val, on every caps mix."""

from __future__ import annotations

import pytest

from alpha_jit.codegen_spirv.dsl import KernelBuilder

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
        with kb.loop(pc["k"], 0, -1) as j:
            acc.set(acc.get() + kb.cast(j, "f32"))
        with kb.loop(kb.cast(gid, "i32"), 100, kb.cast(kb.num_workgroups(0), "i32")) as j:
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
