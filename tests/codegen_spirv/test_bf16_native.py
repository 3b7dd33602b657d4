"""Native bf16 storage (SPV_KHR_bfloat16) where the device has it, emulated elsewhere.

The module must validate everywhere; running it needs a device that reports bfloat16 (the
NVIDIA machine; lavapipe has none, so there the execution test is skipped with the reason).
Both variants must agree on every value: the native conversion and the emulated bit
arithmetic round f32 to bf16 the same way (to nearest even).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from alpha_jit import dtypes
from alpha_jit.codegen_spirv import tools
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels.elementwise import generate_elementwise
from alpha_jit.codegen_spirv.tools import disassemble
from alpha_jit.ir.ops.registry import scalar_rule


def spec(n: int, tag: str) -> KernelSpec:
    # f32 in -> bf16 out (a cast) and bf16 in -> f32 out through exp: both directions
    return KernelSpec("elementwise", f"bf16_roundtrip_{tag}", (
        ("shape", (n,)), ("inputs", (("f32", (1,), 0), ("bf16", (1,), 0))),
        ("exprs", (("copy", "f32", (), (("in", 0),)), ("exp", "f32", (), (("in", 1),)))),
        ("outputs", (("bf16", 0), ("f32", 1))), ("_variant", tag)))


def fake_caps(bf16: bool) -> SimpleNamespace:
    return SimpleNamespace(bfloat16=bf16, storage_buffer_16bit=True, float16=True,
                           max_workgroup_count=(65535, 65535, 65535),
                           max_workgroup_invocations=1024)


def test_native_module_declares_the_khr_type_and_validates():
    b = generate_elementwise(spec(100, "native"), fake_caps(True), scalar_rule)
    text = disassemble(b.words, b.name)
    assert "BFloat16KHR" in text and "SPV_KHR_bfloat16" in text
    tools.validate(b.words, b.name, target_env="vulkan1.3")
    emulated = generate_elementwise(spec(100, "emulated"), fake_caps(False), scalar_rule)
    assert "BFloat16KHR" not in disassemble(emulated.words, emulated.name)


def test_native_and_emulated_agree_on_the_device():
    from alpha_jit.runtime import get_device
    from alpha_jit.runtime.testing import run_kernel

    caps = get_device().caps
    if not caps.bfloat16:
        pytest.skip(f"{caps.name} has no native bf16 (VK_KHR_shader_bfloat16)")
    rng = np.random.default_rng(0)
    n = 4099
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float32)
    bits_in = dtypes.f32_to_bf16(rng.standard_normal(n).astype(np.float32))
    outs = {}
    for tag, c in (("native", caps), ("emulated", dataclasses.replace(caps, bfloat16=False))):
        b = generate_elementwise(spec(n, tag), c, scalar_rule)
        outs[tag] = run_kernel(b, [x, bits_in], [((n,), np.uint16), ((n,), np.float32)])
    np.testing.assert_array_equal(outs["native"][0], dtypes.f32_to_bf16(x))
    np.testing.assert_array_equal(outs["native"][0], outs["emulated"][0])
    np.testing.assert_allclose(outs["native"][1], np.exp(dtypes.bf16_to_f32(bits_in)),
                               rtol=1e-6)
