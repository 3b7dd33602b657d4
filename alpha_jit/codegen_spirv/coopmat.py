"""Cooperative matrices in the kernel DSL (SPV_KHR_cooperative_matrix), typed.

Why: tensor cores are reached from SPIR-V only through cooperative-matrix types, opaque
fragments that one subgroup loads, multiplies and stores together. Written as raw `emit`
calls they are easy to get subtly wrong (a missing capability drops the extension, a stride in
the wrong unit, a load outside uniform control flow), so this layer names the pieces once:
`enable` turns a KernelBuilder into a cooperative-matrix module (SPIR-V 1.6 and the Vulkan
memory model, which the extension requires), `Frag` is a fragment type (element dtype, use,
16 x 16 by default), and loads, stores, multiply-adds, accumulators and the subgroup barrier
that orders a fragment store before the lanes read it back are methods with dtypes checked.

Usage::

    coopmat.enable(kb, "bf16n")                        # before anything is emitted
    fa = coopmat.Frag(kb, "bf16n", "a"); fb = ...; fc = coopmat.Frag(kb, "f32", "acc")
    acc = fc.var()                                     # zero-initialised accumulator
    acc.set(fc.mul_add(fa.load(sh_a, idx, stride), fb.load(sh_b, idx, stride), acc.get()))
    fc.store(scratch, idx, acc.get(), stride); coopmat.subgroup_barrier(kb)

Loads and stores address a workgroup array (SharedArray) or a storage Buffer element; the
index and the row stride are in elements of that array (the extension's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

from .dsl import Buffer, KernelBuilder, SharedArray, cap

_USE = {"a": 0, "b": 1, "acc": 2}  # MatrixAKHR, MatrixBKHR, MatrixAccumulatorKHR
# the element dtype of a fragment as the device's capability list names it
CAPS_NAME = {"bf16n": "bf16", "f16": "f16", "f32": "f32"}


def supported(caps: object, elem: str, m: int = 16, n: int = 16, k: int = 16) -> bool:
    """Whether the device lists elem x elem -> f32 at m x n x k, subgroup scope, and the
    kernels can declare it (native bf16 for bf16, a subgroup size the kernel can pin)."""
    if caps is None or not hasattr(caps, "coopmat"):
        return False
    shapes = caps.coopmat(CAPS_NAME[elem], "f32")
    if not any((s.m, s.n, s.k) == (m, n, k) for s in shapes):
        return False
    if elem == "bf16n" and not (cap(caps, "bfloat16", False)
                                and cap(caps, "storage_buffer_16bit", False)):
        return False
    if not cap(caps, "vulkan_memory_model", False):
        return False
    return subgroup_size(caps) is not None


def subgroup_size(caps: object) -> int | None:
    """The subgroup size a cooperative-matrix kernel is written for: the device's fixed size,
    or 32 where size control can pin it; None where neither holds."""
    lo, hi = int(cap(caps, "min_subgroup_size", 0)), int(cap(caps, "max_subgroup_size", 0))
    if lo == hi and lo > 0:
        return lo
    if cap(caps, "subgroup_size_control", False) and lo <= 32 <= hi:
        return 32
    return None


def enable(kb: KernelBuilder, *elems: str) -> None:
    """Make `kb`'s module a cooperative-matrix module for fragments of `elems`."""
    m = kb.m
    m.version = max(m.version, (1, 6))
    m.emit("OpMemoryModel", "Logical", "Vulkan")
    kb.shared_access = ("NonPrivatePointer",)
    # declared explicitly: implied by BFloat16CooperativeMatrixKHR alone, the extension that
    # defines it would not be added
    m.capability("CooperativeMatrixKHR")
    m.extension("SPV_KHR_cooperative_matrix")
    if "bf16n" in elems:
        m.capability("BFloat16CooperativeMatrixKHR")


def subgroup_barrier(kb: KernelBuilder) -> None:
    """Order the subgroup's workgroup-memory accesses: a fragment stored before it is visible
    to every lane after it (and lane reads finish before the next store)."""
    kb.m.emit("OpControlBarrier", "Subgroup", "Workgroup", "AcquireRelease|WorkgroupMemory")


@dataclass(frozen=True)
class Fragment:
    """An SSA cooperative-matrix value of a `Frag` type."""

    frag: Frag
    id: int


class FragVar:
    """A Function variable holding one fragment (an accumulator across a loop)."""

    def __init__(self, frag: Frag, ptr: int):
        self.frag, self.ptr = frag, ptr

    def get(self) -> Fragment:
        return Fragment(self.frag, self.frag.kb.m.emit("OpLoad", self.frag.type_id, self.ptr))

    def set(self, x: Fragment) -> None:
        self.frag.check(x)
        self.frag.kb.m.emit("OpStore", self.ptr, x.id)


class Frag:
    """A subgroup-scope fragment type: `elem` ("bf16n", "f16", "f32") of `use` ("a" rows x
    K, "b" K x cols, "acc" rows x cols)."""

    def __init__(self, kb: KernelBuilder, elem: str, use: str, rows: int = 16, cols: int = 16):
        self.kb, self.elem, self.use, self.rows, self.cols = kb, elem, use, rows, cols
        u = kb.u32
        self.type_id = kb.m.emit("OpTypeCooperativeMatrixKHR", kb.type(elem), "Subgroup",
                                 u(rows), u(cols), u(_USE[use]))

    def check(self, x: Fragment) -> None:
        if x.frag.type_id != self.type_id:
            raise TypeError(f"fragment of {x.frag.elem}/{x.frag.use} where {self.elem}/"
                            f"{self.use} is expected")

    def zero(self) -> Fragment:
        return Fragment(self, self.kb.m.emit("OpConstantNull", self.type_id))

    def var(self) -> FragVar:
        """A zero-initialised Function variable of this type."""
        m = self.kb.m
        ptr = m.emit("OpVariable", self.kb.ptr_type("Function", self.type_id), "Function")
        v = FragVar(self, ptr)
        v.set(self.zero())
        return v

    def _access(self, mem: SharedArray | Buffer) -> tuple[str, ...]:
        # workgroup memory that other invocations read after a barrier: NonPrivatePointer
        return self.kb.shared_access if isinstance(mem, SharedArray) else ()

    @staticmethod
    def _ptr(src: SharedArray | Buffer, index: object) -> int:
        return src._ptr(index) if isinstance(src, SharedArray) else src.ptr(index)

    def load(self, src: SharedArray | Buffer, index: object, stride: int,
             column_major: bool = False) -> Fragment:
        """The fragment whose element (0, 0) is src[index], rows `stride` elements apart
        (columns, with column_major)."""
        kb = self.kb
        fid = kb.m.emit("OpCooperativeMatrixLoadKHR", self.type_id, self._ptr(src, index),
                        kb.u32(int(column_major)), kb.u32(stride), *self._access(src))
        return Fragment(self, fid)

    def store(self, dst: SharedArray | Buffer, index: object, x: Fragment, stride: int,
              column_major: bool = False) -> None:
        self.check(x)
        kb = self.kb
        kb.m.emit("OpCooperativeMatrixStoreKHR", self._ptr(dst, index), x.id,
                  kb.u32(int(column_major)), kb.u32(stride), *self._access(dst))

    def convert(self, x: Fragment) -> Fragment:
        """x's elements converted to this type's (same shape and use; OpFConvert, whose
        rounding is the driver's: callers convert values the target type holds exactly)."""
        src = x.frag
        if (src.use, src.rows, src.cols) != (self.use, self.rows, self.cols):
            raise TypeError(f"convert {src.elem}/{src.use} {src.rows}x{src.cols} to "
                            f"{self.elem}/{self.use} {self.rows}x{self.cols}")
        return Fragment(self, self.kb.m.emit("OpFConvert", self.type_id, x.id))

    def mul_add(self, a: Fragment, b: Fragment, c: Fragment) -> Fragment:
        """a @ b + c (this type is the accumulator's)."""
        if a.frag.use != "a" or b.frag.use != "b":
            raise TypeError("mul_add(a, b, c) takes an A fragment and a B fragment")
        self.check(c)
        fid = self.kb.m.emit("OpCooperativeMatrixMulAddKHR", self.type_id, a.id, b.id, c.id)
        return Fragment(self, fid)
