"""The kernel-writing layer: typed values, buffers and structured control flow over `Module`.

Why: kernel generators should read like kernels, not like SPIR-V. This layer owns the shader
boilerplate (entry point, LocalSize, descriptor bindings, push constants, builtins) and makes
control flow structured by construction, so every module it produces validates.

Usage guide::

    kb = KernelBuilder("vadd", local_size=256, caps=caps)      # caps: runtime Capabilities|None
    a = kb.buffer("a", "f32", writable=False)                   # binding 0, 1, 2 in order
    b = kb.buffer("b", "bf16", writable=False)                  # f16/bf16 load as f32
    out = kb.buffer("out", "f32", writable=True)
    pc = kb.push_constants([("count", "u32"), ("base", "u32")])  # dict name -> Value
    i = kb.global_id(0) + pc["base"]                            # u32 Values; ints auto-convert
    with kb.if_(i < pc["count"]):
        out.store(i, kb.exp(a.load(i)) + b.load(i) * 2.0)
    words = kb.finish()                                         # bytes; or kb.binary(spec, ...)

Values (`Value`) carry a dtype ("f32", "i32", "u32", "bool", plus "f16"/"u16" for storage) and
support + - * / % // (floor), comparisons (-> bool), & | ^ << >>, unary - and ~. Python numbers
are converted to the other operand's dtype; mixing dtypes needs `kb.cast(v, dtype)` (or
`v.cast(dtype)`). Integer `/` truncates (C), `%` takes the divisor's sign (Python).

Control flow: `with kb.if_(c):`, `with kb.if_else(c) as (then, orelse): with then: ...
with orelse: ...`, `with kb.loop(start, stop, step, max_trips=None) as i:` (i32 unless an
operand is u32; `step` may be a Value, then it must be positive; starts are >= 0; a runtime
stop or step needs `max_trips`, the worst-case trips per entry: `loop_budget.py` adds them up
against llvmpipe's per-invocation loop limit and notes a problem on CPU devices). Mutable
locals: `v = kb.var("f32", 0.0)`, `v.get()`, `v.set(x)`. Workgroup memory:
`s = kb.shared("f32", n)`, `s.load(i)`, `s.store(i, x)`, `kb.barrier()`. Subgroups:
`kb.subgroup_reduce("add"|"max"|"min", x)` and the builtins `kb.subgroup_size()`,
`kb.subgroup_id()`, `kb.subgroup_invocation_id()`, `kb.num_subgroups()`. Math: exp, log, tanh,
sqrt, inversesqrt, abs, fmax, fmin, pow, floor, fma, isnan, isinf, select. Escape hatch:
`kb.op("OpSomething", dtype, *operands)` and `kb.m` (the underlying `Module`).
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from .builder import Module
from .kernel import Binding, Dispatch, KernelBinary, KernelSpec
from .loop_budget import GENERIC_WORKAROUND, LoopBudget, trip_bound

# "bf16n": the native bfloat16 type of SPV_KHR_bfloat16 (storage and conversion only)
_KIND = {"f32": "f", "f16": "f", "bf16n": "f", "i32": "i", "u32": "u", "u16": "u", "bool": "b"}
_SIZE = {"f32": 4, "f16": 2, "bf16n": 2, "i32": 4, "u32": 4, "u16": 2, "bool": 4,
         "u32x4": 16, "f32x4": 16}
_VECTORS = {"u32x4": ("u32", 4), "f32x4": ("f32", 4)}  # 16-byte loads and stores only
_ARITH = {
    "add": {"f": "OpFAdd", "i": "OpIAdd", "u": "OpIAdd"},
    "sub": {"f": "OpFSub", "i": "OpISub", "u": "OpISub"},
    "mul": {"f": "OpFMul", "i": "OpIMul", "u": "OpIMul"},
    "div": {"f": "OpFDiv", "i": "OpSDiv", "u": "OpUDiv"},
    "mod": {"f": "OpFMod", "i": "OpSMod", "u": "OpUMod"},
    "and": {"i": "OpBitwiseAnd", "u": "OpBitwiseAnd", "b": "OpLogicalAnd"},
    "or": {"i": "OpBitwiseOr", "u": "OpBitwiseOr", "b": "OpLogicalOr"},
    "xor": {"i": "OpBitwiseXor", "u": "OpBitwiseXor", "b": "OpLogicalNotEqual"},
    "shl": {"i": "OpShiftLeftLogical", "u": "OpShiftLeftLogical"},
    "shr": {"i": "OpShiftRightArithmetic", "u": "OpShiftRightLogical"},
}
_CMP = {
    "lt": {"f": "OpFOrdLessThan", "i": "OpSLessThan", "u": "OpULessThan"},
    "le": {"f": "OpFOrdLessThanEqual", "i": "OpSLessThanEqual", "u": "OpULessThanEqual"},
    "gt": {"f": "OpFOrdGreaterThan", "i": "OpSGreaterThan", "u": "OpUGreaterThan"},
    "ge": {"f": "OpFOrdGreaterThanEqual", "i": "OpSGreaterThanEqual",
           "u": "OpUGreaterThanEqual"},
    "eq": {"f": "OpFOrdEqual", "i": "OpIEqual", "u": "OpIEqual", "b": "OpLogicalEqual"},
    # Unordered so that NaN != NaN is true, as in numpy.
    "ne": {"f": "OpFUnordNotEqual", "i": "OpINotEqual", "u": "OpINotEqual",
           "b": "OpLogicalNotEqual"},
}
_GLSL_UNARY = {"exp": "Exp", "log": "Log", "tanh": "Tanh", "sqrt": "Sqrt",
               "inversesqrt": "InverseSqrt", "floor": "Floor"}
_GLSL_MINMAX = {"fmax": {"f": "FMax", "i": "SMax", "u": "UMax"},
                "fmin": {"f": "FMin", "i": "SMin", "u": "UMin"}}
_SUBGROUP = {"add": {"f": "OpGroupNonUniformFAdd", "i": "OpGroupNonUniformIAdd",
                     "u": "OpGroupNonUniformIAdd"},
             "max": {"f": "OpGroupNonUniformFMax", "i": "OpGroupNonUniformSMax",
                     "u": "OpGroupNonUniformUMax"},
             "min": {"f": "OpGroupNonUniformFMin", "i": "OpGroupNonUniformSMin",
                     "u": "OpGroupNonUniformUMin"}}
_BUILTIN_VEC = ("GlobalInvocationId", "LocalInvocationId", "WorkgroupId", "NumWorkgroups")
_BUFFER_DTYPES = ("f32", "f16", "i32", "u32", "bf16")


def cap(caps: object, name: str, default: object) -> object:
    """A field of the runtime's Capabilities, or `default` when no device is given."""
    return default if caps is None else getattr(caps, name, default)


def max_groups_x(caps: object) -> int:
    """maxComputeWorkGroupCount[0] (65535 is the Vulkan minimum every device supports)."""
    v = cap(caps, "max_workgroup_count", 65535)
    return int(v[0] if isinstance(v, Sequence) else v)  # type: ignore[index, arg-type]


class Value:
    """An SSA value of a scalar dtype inside the kernel being built."""

    __slots__ = ("kb", "id", "dtype")
    __hash__ = None  # type: ignore[assignment]  # == builds a comparison, not a Python bool

    def __init__(self, kb: KernelBuilder, id: int, dtype: str):
        self.kb, self.id, self.dtype = kb, id, dtype

    def __repr__(self) -> str:
        return f"Value(%{self.id}: {self.dtype})"

    def cast(self, dtype: str) -> Value:
        return self.kb.cast(self, dtype)

    def _bin(self, op: str, other: object, rev: bool = False) -> Value:
        return self.kb.arith(op, other, self) if rev else self.kb.arith(op, self, other)

    def __add__(self, o): return self._bin("add", o)
    def __radd__(self, o): return self._bin("add", o, True)
    def __sub__(self, o): return self._bin("sub", o)
    def __rsub__(self, o): return self._bin("sub", o, True)
    def __mul__(self, o): return self._bin("mul", o)
    def __rmul__(self, o): return self._bin("mul", o, True)
    def __truediv__(self, o): return self._bin("div", o)
    def __rtruediv__(self, o): return self._bin("div", o, True)
    def __mod__(self, o): return self._bin("mod", o)
    def __rmod__(self, o): return self._bin("mod", o, True)
    def __and__(self, o): return self._bin("and", o)
    def __rand__(self, o): return self._bin("and", o, True)
    def __or__(self, o): return self._bin("or", o)
    def __ror__(self, o): return self._bin("or", o, True)
    def __xor__(self, o): return self._bin("xor", o)
    def __lshift__(self, o): return self._bin("shl", o)
    def __rshift__(self, o): return self._bin("shr", o)
    def __floordiv__(self, o): return self.kb.floordiv(self, o)
    def __lt__(self, o): return self.kb.compare("lt", self, o)
    def __le__(self, o): return self.kb.compare("le", self, o)
    def __gt__(self, o): return self.kb.compare("gt", self, o)
    def __ge__(self, o): return self.kb.compare("ge", self, o)
    def __eq__(self, o): return self.kb.compare("eq", self, o)  # type: ignore[override]
    def __ne__(self, o): return self.kb.compare("ne", self, o)  # type: ignore[override]

    def __neg__(self) -> Value:
        k = _KIND[self.dtype]
        return self.kb.op("OpFNegate" if k == "f" else "OpSNegate", self.dtype, self)

    def __invert__(self) -> Value:
        return self.kb.op("OpLogicalNot" if self.dtype == "bool" else "OpNot", self.dtype, self)

    def __bool__(self) -> bool:
        raise TypeError("a kernel Value has no Python truth value; use kb.if_ / kb.select")


class Var:
    """A mutable Function-storage variable (no phis needed across control flow)."""

    def __init__(self, kb: KernelBuilder, ptr: int, dtype: str):
        self.kb, self.ptr, self.dtype = kb, ptr, dtype

    def get(self) -> Value:
        return Value(self.kb, self.kb.m.emit("OpLoad", self.kb.type(self.dtype), self.ptr),
                     self.dtype)

    def set(self, x: object) -> None:
        self.kb.m.emit("OpStore", self.ptr, self.kb.value(x, self.dtype))


class SharedArray:
    """A workgroup-shared array of `n` scalars."""

    def __init__(self, kb: KernelBuilder, var: int, dtype: str, n: int):
        self.kb, self.var, self.dtype, self.n = kb, var, dtype, n

    def _ptr(self, index: object) -> int:
        kb = self.kb
        return kb.m.emit("OpAccessChain", kb.ptr_type("Workgroup", kb.type(self.dtype)),
                         self.var, kb.index(index))

    def load(self, index: object) -> Value:
        kb = self.kb
        return Value(kb, kb.m.emit("OpLoad", kb.type(self.dtype), self._ptr(index),
                                   *kb.shared_access), self.dtype)

    def store(self, index: object, x: object) -> None:
        self.kb.m.emit("OpStore", self._ptr(index), self.kb.value(x, self.dtype),
                       *self.kb.shared_access)


class Buffer:
    """A storage buffer binding; loads return compute dtypes, stores convert to storage."""

    def __init__(self, kb: KernelBuilder, var: int, dtype: str, storage: str, packed: bool,
                 binding: int = -1):
        self.kb, self.var, self.dtype, self.binding = kb, var, dtype, binding
        self.storage = storage  # element type in the shader: f32, f16, i32, u32, u16
        self.packed = packed  # bf16 as two halves of a u32 word (no 16-bit storage)
        self.compute = "f32" if dtype in ("f16", "bf16") else dtype

    def ptr(self, index: object) -> int:
        """Pointer to element `index` of the storage array (for atomics and raw access)."""
        kb = self.kb
        zero = kb.const(0, "u32")
        return kb.m.emit("OpAccessChain", kb.ptr_type("StorageBuffer", kb.type(self.storage)),
                         self.var, zero, kb.index(index))

    def load_raw(self, index: object) -> Value:
        """The stored element without conversion (f16 stays f16, bf16 is u16 bits)."""
        kb = self.kb
        return Value(kb, kb.m.emit("OpLoad", kb.type(self.storage), self.ptr(index)),
                     self.storage)

    def load(self, index: object) -> Value:
        kb = self.kb
        if self.packed:
            i = kb.index(index, "u32")
            word = self.load_raw(i >> 1)
            bits = (word >> ((i & 1) * 16)) & 0xFFFF
            return kb.bitcast(bits << 16, "f32")
        raw = self.load_raw(index)
        if self.storage == "bf16n":  # widen through the bits: exact, and no FConvert needed
            raw = kb.bitcast(raw, "u16")
        if self.dtype == "bf16" and raw.dtype == "u16":
            return kb.bitcast(kb.cast(raw, "u32") << 16, "f32")
        return kb.cast(raw, self.compute)

    def store(self, index: object, x: object) -> None:
        kb = self.kb
        v = kb.cast(kb.value(x, self.compute), self.compute)
        if self.dtype == "bf16" and self.storage != "bf16n":
            bits = kb.bf16_bits(v)
            if self.packed:
                i = kb.index(index, "u32")
                shift = (i & 1) * 16
                ptr = self.ptr(i >> 1)
                u32 = kb.type("u32")
                # Two threads may own the halves of one word: clear then set ours, atomically.
                kb.m.emit("OpAtomicAnd", u32, ptr, "Device", "Relaxed",
                          kb.value(~(kb.const(0xFFFF, "u32") << shift), "u32"))
                kb.m.emit("OpAtomicOr", u32, ptr, "Device", "Relaxed", bits << shift)
                return
            v = kb.cast(bits, "u16")
        elif self.storage == "bf16n":
            # round to nearest even in integer bits and store the bits: the native conversion's
            # rounding is the driver's choice (NVIDIA truncates) and it costs instructions
            v = kb.to_bf16n(v)
        elif self.storage != self.compute:
            v = kb.cast(v, self.storage)
        kb.m.emit("OpStore", self.ptr(index), v)


@dataclass
class _Branch:
    """One arm of an if/else: entering it opens its block, leaving it jumps to the merge."""

    kb: KernelBuilder
    label: int
    merge: int
    used: bool = False

    def __enter__(self) -> None:
        self.used = True
        self.kb.m.emit("OpLabel", result=self.label)

    def __exit__(self, *exc: object) -> None:
        self.kb.m.emit("OpBranch", self.merge)


class KernelBuilder:
    """Builds one GLCompute entry point `main` with the given local size."""

    def __init__(self, name: str, local_size: int | Sequence[int] = 256, caps: object = None):
        self.name = name
        ls = (local_size,) if isinstance(local_size, int) else tuple(local_size)
        self.local_size: tuple[int, int, int] = tuple((*ls, 1, 1)[:3])  # type: ignore[assignment]
        self.caps = caps
        self.storage16 = bool(cap(caps, "storage_buffer_16bit", True))
        # native bf16 (SPV_KHR_bfloat16) only where the device reports it, with 16-bit storage
        self.native_bf16 = bool(cap(caps, "bfloat16", False)) and self.storage16
        self.m = Module((1, 5), arith16=bool(cap(caps, "float16", True)))
        self.bindings: list[Binding] = []
        # set before declaring buffers when the kernel may run in place (spec ("aliased", True))
        self.aliased = False
        # memory operands of workgroup-memory accesses: under the Vulkan memory model a
        # barrier orders only NonPrivatePointer accesses (coopmat.enable sets it)
        self.shared_access: tuple[str, ...] = ()
        self.push_constant_size = 0
        self.shared_bytes = 0
        self._builtins: dict[str, int] = {}
        self._types: dict[str, int] = {}
        self._consts: dict[tuple, int] = {}
        self._const_ints: dict[int, int] = {}  # id -> value of integer constants (loop bounds)
        self.loops = LoopBudget()  # this kernel's bound on loop passes per invocation
        # what the problem note on a CPU device over llvmpipe's loop limit tells the user
        self.loop_workaround = GENERIC_WORKAROUND
        self._glsl = self.m.ext_import("GLSL.std.450")
        void = self.type("void")
        self._fn = self.m.emit("OpFunction", void, "None", self.m.emit("OpTypeFunction", void))
        self.m.emit("OpLabel")

    # -- types and constants ------------------------------------------------------------

    def type(self, dtype: str) -> int:
        # memoised: kernels ask for their types ~100k times per GPT-2 step's generation, and
        # each ask re-encoded an instruction only to find it deduplicated
        tid = self._types.get(dtype)
        if tid is None:
            tid = self._types[dtype] = self._new_type(dtype)
        return tid

    def _new_type(self, dtype: str) -> int:
        m = self.m
        if dtype == "void":
            return m.emit("OpTypeVoid")
        if dtype == "bool":
            return m.emit("OpTypeBool")
        if dtype in ("f32", "f16"):
            return m.emit("OpTypeFloat", 32 if dtype == "f32" else 16)
        if dtype == "bf16n":
            return m.emit("OpTypeFloat", 16, "BFloat16KHR")
        if dtype in ("i32", "u32", "u16"):
            return m.emit("OpTypeInt", 16 if dtype == "u16" else 32, int(dtype == "i32"))
        if dtype in _VECTORS:
            comp, n = _VECTORS[dtype]
            return m.emit("OpTypeVector", self.type(comp), n)
        raise TypeError(f"no shader type for dtype {dtype!r}")

    def ptr_type(self, storage_class: str, type_id: int) -> int:
        return self.m.emit("OpTypePointer", storage_class, type_id)

    def const(self, value: object, dtype: str) -> Value:
        if dtype == "bool":
            return Value(self, self.m.emit("OpConstantTrue" if value else "OpConstantFalse",
                                           self.type("bool")), "bool")
        if _KIND[dtype] == "f":
            value = float(value)  # type: ignore[arg-type]
            key = (dtype, value, math.copysign(1.0, value))  # -0.0 == 0.0; NaN never hits
        else:
            value = int(value)  # type: ignore[call-overload]
            key = (dtype, value, 1.0)
        cid = self._consts.get(key)
        if cid is None:
            cid = self._consts[key] = self.m.emit("OpConstant", self.type(dtype), value)
            if _KIND[dtype] in "iu":
                self._const_ints[cid] = value  # type: ignore[assignment]
        return Value(self, cid, dtype)

    def f32(self, x: float) -> Value:
        return self.const(x, "f32")

    def i32(self, x: int) -> Value:
        return self.const(x, "i32")

    def u32(self, x: int) -> Value:
        return self.const(x, "u32")

    def bool_(self, x: bool) -> Value:
        return self.const(x, "bool")

    def value(self, x: object, dtype: str) -> Value:
        """`x` as a Value: Python numbers become constants of `dtype`; Values pass through."""
        if isinstance(x, Value):
            return x
        if isinstance(x, (bool, int, float)):
            return self.const(x, dtype)
        raise TypeError(f"cannot use {x!r} as a kernel value")

    def index(self, x: object, dtype: str | None = None) -> Value:
        """An integer index Value (Python ints become i32, or `dtype`)."""
        if isinstance(x, Value):
            return x if dtype is None else self.cast(x, dtype)
        return self.const(int(x), dtype or "i32")  # type: ignore[call-overload]

    # -- generic operations --------------------------------------------------------------

    def op(self, opname: str, dtype: str, *operands: object) -> Value:
        """Emit an instruction with result type `dtype` and wrap the result."""
        return Value(self, self.m.emit(opname, self.type(dtype), *operands), dtype)

    def _pair(self, a: object, b: object) -> tuple[Value, Value]:
        if isinstance(a, Value):
            return a, self.value(b, a.dtype)
        if isinstance(b, Value):
            return self.value(a, b.dtype), b
        raise TypeError("at least one operand must be a kernel Value")

    def arith(self, op: str, a: object, b: object) -> Value:
        a, b = self._pair(a, b)
        if a.dtype != b.dtype and op not in ("shl", "shr"):
            raise TypeError(f"{op}: dtype mismatch {a.dtype} vs {b.dtype}; cast explicitly")
        try:
            opname = _ARITH[op][_KIND[a.dtype]]
        except KeyError:
            raise TypeError(f"{op} is not defined for {a.dtype}") from None
        return self.op(opname, a.dtype, a, b)

    def floordiv(self, a: object, b: object) -> Value:
        """Python `//`: floor for floats and signed ints (truncation corrected)."""
        a, b = self._pair(a, b)
        if _KIND[a.dtype] == "f":
            return self.glsl("Floor", a.dtype, a / b)
        q = a / b
        if a.dtype != "i32":
            return q
        fix = (q * b != a) & ((a < 0) ^ (b < 0))
        return self.select(fix, q - 1, q)

    def compare(self, op: str, a: object, b: object) -> Value:
        a, b = self._pair(a, b)
        if a.dtype != b.dtype:
            raise TypeError(f"{op}: dtype mismatch {a.dtype} vs {b.dtype}; cast explicitly")
        return self.op(_CMP[op][_KIND[a.dtype]], "bool", a, b)

    def select(self, cond: Value, a: object, b: object) -> Value:
        a, b = self._pair(a, b)
        return self.op("OpSelect", a.dtype, cond, a, b)

    def glsl(self, inst: str, dtype: str, *args: object) -> Value:
        """A GLSL.std.450 extended instruction."""
        return self.op("OpExtInst", dtype, self._glsl, inst, *args)

    def _unary(self, name: str, x: object) -> Value:
        x = self.value(x, "f32")
        return self.glsl(_GLSL_UNARY[name], x.dtype, x)

    def exp(self, x: object) -> Value: return self._unary("exp", x)
    def log(self, x: object) -> Value: return self._unary("log", x)
    def tanh(self, x: object) -> Value: return self._unary("tanh", x)
    def sqrt(self, x: object) -> Value: return self._unary("sqrt", x)
    def inversesqrt(self, x: object) -> Value: return self._unary("inversesqrt", x)
    def floor(self, x: object) -> Value: return self._unary("floor", x)

    def abs(self, x: Value) -> Value:
        return self.glsl("FAbs" if _KIND[x.dtype] == "f" else "SAbs", x.dtype, x)

    def fmax(self, a: object, b: object) -> Value:
        a, b = self._pair(a, b)
        return self.glsl(_GLSL_MINMAX["fmax"][_KIND[a.dtype]], a.dtype, a, b)

    def fmin(self, a: object, b: object) -> Value:
        a, b = self._pair(a, b)
        return self.glsl(_GLSL_MINMAX["fmin"][_KIND[a.dtype]], a.dtype, a, b)

    def pow(self, a: object, b: object) -> Value:
        a, b = self._pair(a, b)
        return self.glsl("Pow", a.dtype, a, b)

    def fma(self, a: Value, b: object, c: object) -> Value:
        return self.glsl("Fma", a.dtype, a, self.value(b, a.dtype), self.value(c, a.dtype))

    def isnan(self, x: Value) -> Value:
        return self.op("OpIsNan", "bool", x)

    def isinf(self, x: Value) -> Value:
        return self.op("OpIsInf", "bool", x)

    def bitcast(self, x: Value, dtype: str) -> Value:
        return self.op("OpBitcast", dtype, x)

    def cast(self, x: object, dtype: str) -> Value:
        """Numeric conversion (f32<->i32 truncates; bool -> 1/0; number -> bool is != 0)."""
        x = self.value(x, dtype)
        src = x.dtype
        if src == dtype:
            return x
        ks, kd = _KIND[src], _KIND[dtype]
        if ks == "b":
            return self.select(x, self.const(1, dtype), self.const(0, dtype))
        if kd == "b":
            return x != self.const(0, src)
        if ks == "f" and kd == "f":
            return self.op("OpFConvert", dtype, x)
        if ks == "f":
            return self.op("OpConvertFToS" if kd == "i" else "OpConvertFToU", dtype, x)
        if kd == "f":
            return self.op("OpConvertSToF" if ks == "i" else "OpConvertUToF", dtype, x)
        if _SIZE[src] != _SIZE[dtype]:  # u16 <-> 32-bit integers
            mid = self.op("OpUConvert", "u32" if _SIZE[dtype] == 4 else "u16",
                          x if ks == "u" else self.bitcast(x, "u32"))
            return mid if mid.dtype == dtype else self.bitcast(mid, dtype)
        return self.bitcast(x, dtype)

    def bf16_bits(self, x: Value) -> Value:
        """u32 holding the bf16 bit pattern of f32 `x`, rounded to nearest even (NaN kept)."""
        u = self.bitcast(x, "u32")
        rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
        return self.select(self.isnan(x), self.u32(0x7FC0), rounded)

    def to_bf16n(self, x: Value) -> Value:
        """f32 `x` as a native bf16 value, rounded to nearest even through its bits (the
        driver's OpFConvert may truncate, and NVIDIA's is slower than the integer path)."""
        return self.bitcast(self.cast(self.bf16_bits(x), "u16"), "bf16n")

    def from_bf16n(self, x: Value) -> Value:
        """A native bf16 value widened to f32 exactly, through its bits."""
        return self.bitcast(self.cast(self.bitcast(x, "u16"), "u32") << 16, "f32")

    # -- resources ------------------------------------------------------------------------

    def buffer(self, name: str, dtype: str, writable: bool) -> Buffer:
        """Storage buffer at the next binding of set 0 (an array of `dtype`)."""
        if dtype not in _BUFFER_DTYPES:
            raise TypeError(f"buffer dtype must be one of {_BUFFER_DTYPES}, got {dtype!r}")
        packed = dtype == "bf16" and not self.storage16
        # bf16: the device's native type where it has one, else u16 bits (or packed halves)
        bf16_storage = "bf16n" if self.native_bf16 else ("u32" if packed else "u16")
        storage = {"bf16": bf16_storage}.get(dtype, dtype)
        if dtype == "f16" and not self.storage16:
            raise TypeError("f16 buffers need 16-bit storage (storage_buffer_16bit)")
        m = self.m
        elem = self.type(storage)
        arr = m.emit("OpTypeRuntimeArray", elem)
        m.emit("OpDecorate", arr, "ArrayStride", _SIZE[storage])
        block = m.emit("OpTypeStruct", arr, dedupe=False)  # own struct: own NonWritable
        m.emit("OpMemberDecorate", block, 0, "Offset", 0)
        if not writable and not self.aliased:
            m.emit("OpMemberDecorate", block, 0, "NonWritable")
        m.emit("OpDecorate", block, "Block")
        var = m.emit("OpVariable", self.ptr_type("StorageBuffer", block), "StorageBuffer")
        if self.aliased:  # an in-place kernel: its input and output may be the same memory
            m.emit("OpDecorate", var, "Aliased")
        m.emit("OpDecorate", var, "DescriptorSet", 0)
        m.emit("OpDecorate", var, "Binding", len(self.bindings))
        m.emit("OpName", var, name)
        self.bindings.append(Binding(name, dtype, writable))
        return Buffer(self, var, dtype, storage, packed, len(self.bindings) - 1)

    def buffer_view(self, buf: Buffer, dtype: str, writable: bool = False) -> Buffer:
        """The same binding as `buf`, seen as an array of `dtype` ("u32x4", "f32x4"):
        16-byte loads (and stores, where `writable` and `buf` is), indexed in those units.
        The binding's offset and the indices must be 16-byte aligned (the caller's to
        check)."""
        if dtype not in _VECTORS:
            raise TypeError(f"buffer views are {tuple(_VECTORS)}, not {dtype!r}")
        if writable and not self.bindings[buf.binding].writable:
            raise TypeError(f"a writable view of read-only binding {buf.binding}")
        m = self.m
        arr = m.emit("OpTypeRuntimeArray", self.type(dtype))
        m.emit("OpDecorate", arr, "ArrayStride", _SIZE[dtype])
        block = m.emit("OpTypeStruct", arr, dedupe=False)
        m.emit("OpMemberDecorate", block, 0, "Offset", 0)
        if not writable and not self.aliased:  # as `buffer`: in-place kernels' memory is shared
            m.emit("OpMemberDecorate", block, 0, "NonWritable")
        m.emit("OpDecorate", block, "Block")
        var = m.emit("OpVariable", self.ptr_type("StorageBuffer", block), "StorageBuffer")
        if self.aliased:
            m.emit("OpDecorate", var, "Aliased")
        m.emit("OpDecorate", var, "DescriptorSet", 0)
        m.emit("OpDecorate", var, "Binding", buf.binding)
        return Buffer(self, var, dtype, dtype, False, buf.binding)

    def null(self, dtype: str) -> Value:
        """The all-zero value of `dtype` (vectors included)."""
        return Value(self, self.m.emit("OpConstantNull", self.type(dtype)), dtype)

    def extract(self, vec: Value, i: int) -> Value:
        """Component i of a vector Value."""
        return self.op("OpCompositeExtract", _VECTORS[vec.dtype][0], vec, i)

    def vector(self, dtype: str, parts: Sequence[Value]) -> Value:
        """A vector Value of `dtype` from its components."""
        return self.op("OpCompositeConstruct", dtype, *parts)

    def push_constants(self, fields: Sequence[tuple[str, str]]) -> dict[str, Value]:
        """Declare the push-constant block (32-bit scalars) and load every field."""
        if self.push_constant_size:
            raise ValueError("push_constants() may be called once per kernel")
        m = self.m
        types = [self.type(dt) for _, dt in fields]
        block = m.emit("OpTypeStruct", *types, dedupe=False)
        for k, (fname, _) in enumerate(fields):
            m.emit("OpMemberDecorate", block, k, "Offset", 4 * k)
            m.emit("OpMemberName", block, k, fname)
        m.emit("OpDecorate", block, "Block")
        var = m.emit("OpVariable", self.ptr_type("PushConstant", block), "PushConstant")
        self.push_constant_size = 4 * len(fields)
        out = {}
        for k, (fname, dt) in enumerate(fields):
            p = m.emit("OpAccessChain", self.ptr_type("PushConstant", self.type(dt)), var,
                       self.const(k, "u32"))
            out[fname] = Value(self, m.emit("OpLoad", self.type(dt), p), dt)
        return out

    def shared(self, dtype: str, n: int) -> SharedArray:
        """Workgroup-shared array of `n` elements (counted in `shared_bytes`)."""
        m = self.m
        arr = m.emit("OpTypeArray", self.type(dtype), self.const(n, "u32"))
        var = m.emit("OpVariable", self.ptr_type("Workgroup", arr), "Workgroup")
        self.shared_bytes += n * _SIZE[dtype]
        return SharedArray(self, var, dtype, n)

    def var(self, dtype: str, init: object = None) -> Var:
        ptr = self.m.emit("OpVariable", self.ptr_type("Function", self.type(dtype)), "Function")
        v = Var(self, ptr, dtype)
        if init is not None:
            v.set(init)
        return v

    # -- builtins -------------------------------------------------------------------------

    def _builtin(self, name: str) -> Value:
        vec = name in _BUILTIN_VEC
        if name not in self._builtins:
            t = self.type("u32")
            if vec:
                t = self.m.emit("OpTypeVector", t, 3)
            var = self.m.emit("OpVariable", self.ptr_type("Input", t), "Input")
            self.m.emit("OpDecorate", var, "BuiltIn", name)
            self._builtins[name] = var
        var = self._builtins[name]
        t = self.type("u32")
        if vec:
            t = self.m.emit("OpTypeVector", t, 3)
        return Value(self, self.m.emit("OpLoad", t, var), "vec3" if vec else "u32")

    def _component(self, name: str, axis: int) -> Value:
        v = self._builtin(name)
        return self.op("OpCompositeExtract", "u32", v, axis)

    def global_id(self, axis: int = 0) -> Value:
        return self._component("GlobalInvocationId", axis)

    def local_id(self, axis: int = 0) -> Value:
        return self._component("LocalInvocationId", axis)

    def workgroup_id(self, axis: int = 0) -> Value:
        return self._component("WorkgroupId", axis)

    def num_workgroups(self, axis: int = 0) -> Value:
        return self._component("NumWorkgroups", axis)

    def local_index(self) -> Value:
        return self._builtin("LocalInvocationIndex")

    def subgroup_size(self) -> Value:
        return self._builtin("SubgroupSize")

    def subgroup_id(self) -> Value:
        return self._builtin("SubgroupId")

    def subgroup_invocation_id(self) -> Value:
        return self._builtin("SubgroupLocalInvocationId")

    def num_subgroups(self) -> Value:
        return self._builtin("NumSubgroups")

    # -- synchronisation and subgroups ------------------------------------------------------

    def barrier(self) -> None:
        """Workgroup execution + shared-memory barrier."""
        self.m.emit("OpControlBarrier", "Workgroup", "Workgroup",
                    "AcquireRelease|WorkgroupMemory")

    def subgroup_reduce(self, op: str, x: Value) -> Value:
        """Reduce `x` over the active invocations of the subgroup ("add" | "max" | "min")."""
        return self.op(_SUBGROUP[op][_KIND[x.dtype]], x.dtype, "Subgroup", "Reduce", x)

    # -- structured control flow --------------------------------------------------------------

    @contextmanager
    def if_(self, cond: Value) -> Iterator[None]:
        then, merge = self.m.id(), self.m.id()
        self.m.emit("OpSelectionMerge", merge, "None")
        self.m.emit("OpBranchConditional", cond, then, merge)
        self.m.emit("OpLabel", result=then)
        yield
        self.m.emit("OpBranch", merge)
        self.m.emit("OpLabel", result=merge)

    def when(self, cond: Value | None) -> contextlib.AbstractContextManager:
        """`kb.if_(cond)`, or no branch at all where cond is None (a guard that a generator
        only needs on some paths)."""
        return contextlib.nullcontext() if cond is None else self.if_(cond)

    @contextmanager
    def if_else(self, cond: Value) -> Iterator[tuple[_Branch, _Branch]]:
        """`with kb.if_else(c) as (then, orelse): with then: ...  with orelse: ...`"""
        merge = self.m.id()
        arms = (_Branch(self, self.m.id(), merge), _Branch(self, self.m.id(), merge))
        self.m.emit("OpSelectionMerge", merge, "None")
        self.m.emit("OpBranchConditional", cond, arms[0].label, arms[1].label)
        yield arms
        for arm in arms:  # an arm the caller left out is an empty block
            if not arm.used:
                with arm:
                    pass
        self.m.emit("OpLabel", result=merge)

    def _static_int(self, x: object) -> int | None:
        """x as a Python int where it is one or an integer constant; None: a runtime value."""
        if isinstance(x, Value):
            return self._const_ints.get(x.id)
        return int(x) if isinstance(x, int) else None

    @contextmanager
    def loop(self, start: object, stop: object, step: object = 1,
             max_trips: int | None = None) -> Iterator[Value]:
        """`for i in range(start, stop, step)` as a structured loop; yields `i`. Starts are
        >= 0; where stop or step is a runtime value, `max_trips` bounds the trips per entry
        (llvmpipe's loop limit: `loop_budget.py`; a loop without a bound raises)."""
        trips = trip_bound(*(self._static_int(v) for v in (start, stop, step)), max_trips)
        dtype = next((v.dtype for v in (start, stop, step) if isinstance(v, Value)), "i32")
        counter = self.var(dtype, self.cast(self.value(start, dtype), dtype))
        stop_v = self.cast(self.value(stop, dtype), dtype)
        step_v = self.cast(self.value(step, dtype), dtype)
        down = isinstance(step, int) and step < 0
        header, body, cont, merge = (self.m.id() for _ in range(4))
        self.m.emit("OpBranch", header)
        self.m.emit("OpLabel", result=header)
        i = counter.get()
        go_on = (i > stop_v) if down else (i < stop_v)
        self.m.emit("OpLoopMerge", merge, cont, "None")
        self.m.emit("OpBranchConditional", go_on, body, merge)
        self.m.emit("OpLabel", result=body)
        self.loops.enter(trips)
        yield i
        self.loops.exit()
        self.m.emit("OpBranch", cont)
        self.m.emit("OpLabel", result=cont)
        counter.set(counter.get() + step_v)
        self.m.emit("OpBranch", header)
        self.m.emit("OpLabel", result=merge)

    # -- output -----------------------------------------------------------------------------

    def finish(self) -> bytes:
        """Close `main`, add the entry point and LocalSize, and return the module bytes."""
        if self._fn is not None:
            self.m.emit("OpReturn")
            self.m.emit("OpFunctionEnd")
            self.m.emit("OpEntryPoint", "GLCompute", self._fn, "main")
            self.m.emit("OpExecutionMode", self._fn, "LocalSize", *self.local_size)
            if cap(self.caps, "inf_nan_preserve_f32", False):
                # NaN and inf are values the user must see: no x * 0 -> 0 folding
                self.m.emit("OpExecutionMode", self._fn, "SignedZeroInfNanPreserve", 32)
            if cap(self.caps, "denorm_preserve_f32", False):
                # denormals are values too (numpy's 1e-45 // -1 is -1, not -0): no flushing
                self.m.emit("OpExecutionMode", self._fn, "DenormPreserve", 32)
            self.m.emit("OpName", self._fn, "main")
            self._fn = None
            self._words = self.m.finish()
        return self._words

    def binary(self, spec: KernelSpec, dispatches: Sequence[Dispatch],
               notes: dict | None = None) -> KernelBinary:
        """Finish and package the module with its bindings and dispatches for the runtime;
        notes["loop_passes"] is the loop bound, and on a CPU device a bound over llvmpipe's
        limit adds notes["problem"] (the plan then refuses the step before it runs)."""
        notes = {**(notes or {}), "loop_passes": self.loops.passes}
        over = self.loops.problem(self.name, self.loop_workaround)
        if over is not None and cap(self.caps, "device_type", None) == "cpu":
            notes["problem"] = "; ".join(filter(None, (notes.get("problem"), over)))
        return KernelBinary(spec=spec, words=self.finish(), bindings=tuple(self.bindings),
                            local_size=self.local_size, dispatches=tuple(dispatches),
                            push_constant_size=self.push_constant_size,
                            shared_bytes=self.shared_bytes, notes=notes)


def pack_push_constants(values: Sequence[tuple[str, object]]) -> bytes:
    """Bytes of a push-constant block: (dtype, value) pairs, 4 bytes each."""
    fmt = {"u32": "I", "i32": "i", "f32": "f"}
    return b"".join(struct.pack("<" + fmt[dt], v) for dt, v in values)
