"""Builder basics: grammar lookups, de-duplication, capability/extension derivation, errors."""

from __future__ import annotations

import struct

import pytest

from alpha_jit.codegen_spirv import tools
from alpha_jit.codegen_spirv.builder import MAGIC, Module
from alpha_jit.codegen_spirv.grammar import core, ext_set
from alpha_jit.errors import SpirvToolError


def test_grammar_lookups():
    g = core()
    assert g.opcode("OpIAdd") == 128
    assert g.enum_value("StorageClass", "StorageBuffer") == 12
    assert g.enum_value("MemorySemantics", "AcquireRelease|WorkgroupMemory") == 0x8 | 0x100
    assert "GroupNonUniformArithmetic" in g.instruction("OpGroupNonUniformFAdd").capabilities
    assert g.enumerant("Capability", "StorageBuffer16BitAccess").extensions
    assert ext_set("GLSL.std.450").opcode("Exp") == 27


def _compute_shell(m: Module) -> tuple[int, int]:
    void = m.emit("OpTypeVoid")
    fn = m.emit("OpFunction", void, "None", m.emit("OpTypeFunction", void))
    m.emit("OpLabel")
    return void, fn


def _close(m: Module, fn: int) -> bytes:
    m.emit("OpReturn")
    m.emit("OpFunctionEnd")
    m.emit("OpEntryPoint", "GLCompute", fn, "main")
    m.emit("OpExecutionMode", fn, "LocalSize", 1, 1, 1)
    return m.finish()


def test_types_and_constants_dedupe():
    m = Module()
    f32 = m.emit("OpTypeFloat", 32)
    assert m.emit("OpTypeFloat", 32) == f32
    assert m.emit("OpTypeInt", 32, 1) != m.emit("OpTypeInt", 32, 0)
    c = m.emit("OpConstant", f32, 1.5)
    assert m.emit("OpConstant", f32, 1.5) == c
    assert m.emit("OpConstant", f32, 2.5) != c
    s1 = m.emit("OpTypeStruct", f32, dedupe=False)
    assert m.emit("OpTypeStruct", f32, dedupe=False) != s1


def test_header_sections_and_validation():
    m = Module()
    _, fn = _compute_shell(m)
    words = _close(m, fn)
    magic, version, _, bound, _ = struct.unpack("<5I", words[:20])
    assert magic == MAGIC and version == 0x00010500 and bound > fn
    tools.validate(words, "shell")
    text = tools.disassemble(words, "shell")
    assert text.index("OpCapability Shader") < text.index("OpMemoryModel")


def test_capabilities_derived_from_grammar_and_types():
    m = Module()
    _, fn = _compute_shell(m)
    f16 = m.emit("OpTypeFloat", 16)
    u32 = m.emit("OpTypeInt", 32, 0)
    arr = m.emit("OpTypeRuntimeArray", f16)
    m.emit("OpDecorate", arr, "ArrayStride", 2)
    block = m.emit("OpTypeStruct", arr)
    m.emit("OpMemberDecorate", block, 0, "Offset", 0)
    m.emit("OpDecorate", block, "Block")
    var = m.emit("OpVariable", m.emit("OpTypePointer", "StorageBuffer", block), "StorageBuffer")
    m.emit("OpDecorate", var, "DescriptorSet", 0)
    m.emit("OpDecorate", var, "Binding", 0)
    ptr = m.emit("OpAccessChain", m.emit("OpTypePointer", "StorageBuffer", f16), var,
                 m.emit("OpConstant", u32, 0), m.emit("OpConstant", u32, 0))
    x = m.emit("OpLoad", f16, ptr)
    s = m.emit("OpGroupNonUniformFAdd", f16, "Subgroup", "Reduce", x)
    m.emit("OpStore", ptr, s)
    words = _close(m, fn)
    caps = m.resolved_capabilities()
    assert {"Shader", "Float16", "StorageBuffer16BitAccess", "GroupNonUniformArithmetic"} <= set(
        caps)
    assert "Kernel" not in caps
    tools.validate(words, "caps")


def test_extensions_only_when_not_core():
    m = Module(version=(1, 0))
    m.emit("OpTypePointer", "StorageBuffer", m.emit("OpTypeFloat", 32))
    assert "SPV_KHR_storage_buffer_storage_class" in m._extensions
    m2 = Module(version=(1, 5))
    m2.emit("OpTypePointer", "StorageBuffer", m2.emit("OpTypeFloat", 32))
    assert not m2._extensions


def test_operand_errors():
    m = Module()
    with pytest.raises(TypeError, match="missing operand"):
        m.emit("OpTypeInt", 32)
    with pytest.raises(KeyError, match="NotAClass"):
        m.emit("OpTypePointer", "NotAClass", 1)


def test_tool_errors_name_the_kernel():
    m = Module()
    void, fn = _compute_shell(m)
    m.emit("OpReturn")
    m.emit("OpFunctionEnd")  # no entry point: invalid for Vulkan
    bad = m.finish()
    with pytest.raises(SpirvToolError, match="my_kernel") as e:
        tools.validate(bad, "my_kernel")
    assert "spirv-val" in str(e.value)
    with pytest.raises(SpirvToolError, match="other_kernel"):
        tools.optimize(b"\x00" * 20, "other_kernel")


def test_optimize_roundtrip():
    m = Module()
    _, fn = _compute_shell(m)
    opt = tools.optimize(_close(m, fn), "opt")
    tools.validate(opt, "opt")
