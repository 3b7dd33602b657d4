"""A grammar-driven SPIR-V module builder: one generic `emit`, sections in order, binary out.

Why: every kernel generator needs the same bookkeeping (ids, de-duplicated types and constants,
the logical-layout section order, the capabilities and extensions that the used instructions,
enumerants and types require). Doing it once here, from the Khronos grammar, keeps the kernel
code about kernels. Operands are encoded by the grammar's operand kind at each position:

    m = Module()
    f32 = m.emit("OpTypeFloat", 32)                   # -> result id (types/constants deduped)
    one = m.emit("OpConstant", f32, 1.0)              # literal encoded by the result type
    m.emit("OpDecorate", var, "BuiltIn", "GlobalInvocationId")   # enumerant + its parameters
    m.emit("OpControlBarrier", "Workgroup", "Workgroup", "AcquireRelease|WorkgroupMemory")
    words = m.finish()                                # bytes, little-endian 32-bit words

Ids are ints; objects with an `.id` attribute (DSL values) are accepted where an id is expected.
At `IdScope` / `IdMemorySemantics` positions an enumerant name becomes a u32 constant.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from .grammar import Grammar, Instruction, core, ext_set, version_tuple

MAGIC = 0x07230203
# Capabilities that only exist for OpenCL kernels: never pick them to satisfy a requirement.
_KERNEL_ONLY_CAPS = frozenset(
    {"Kernel", "Addresses", "Linkage", "Vector16", "Float16Buffer", "ImageBasic", "Pipes",
     "DeviceEnqueue", "GenericPointer", "Groups"}
)
_GLOBAL_CLASSES = ("Type-Declaration", "Constant-Creation")
_ID_KINDS = ("IdRef", "IdResultType", "IdScope", "IdMemorySemantics")
# 16/8-bit storage capabilities per storage class, for types that hold narrow scalars.
_NARROW_STORAGE = {
    16: {"StorageBuffer": "StorageBuffer16BitAccess", "PushConstant": "StoragePushConstant16",
         "Uniform": "UniformAndStorageBuffer16BitAccess"},
    8: {"StorageBuffer": "StorageBuffer8BitAccess", "PushConstant": "StoragePushConstant8",
        "Uniform": "UniformAndStorageBuffer8BitAccess"},
}


def _as_id(x: object) -> int:
    if isinstance(x, bool):
        raise TypeError("a bool is not an id")
    if isinstance(x, int):
        return x
    i = getattr(x, "id", None)
    if isinstance(i, int):
        return i
    raise TypeError(f"expected a SPIR-V id, got {x!r}")


def _string_words(s: str) -> list[int]:
    raw = s.encode("utf-8") + b"\0"
    raw += b"\0" * (-len(raw) % 4)
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


class Module:
    """One SPIR-V module under construction (a single shader module with its functions)."""

    def __init__(self, version: tuple[int, int] = (1, 5), *, arith16: bool = True,
                 addressing: str = "Logical", memory_model: str = "GLSL450"):
        self.g: Grammar = core()
        self.version = version
        self.arith16 = arith16  # False: 16-bit types only for storage (no Float16/Int16 caps)
        self._next_id = 1
        self._explicit_caps: list[str] = []
        self._cap_reqs: list[tuple[str, ...]] = []  # each: any one of these capabilities
        self._extensions: list[str] = []
        self._ext_imports: dict[str, int] = {}
        self._ext_import_of: dict[int, str] = {}
        self._memory_model = (addressing, memory_model)
        self._entry_points: list[tuple[str, int, str, Sequence[int] | None]] = []
        self._exec_modes: list[list[int]] = []
        self._debug: list[list[int]] = []
        self._annotations: list[list[int]] = []
        self._annotation_keys: set[tuple[int, ...]] = set()
        self._globals: list[list[int]] = []
        self._functions: list[list[int]] = []
        self._dedupe: dict[tuple, int] = {}
        self.types: dict[int, tuple[str, tuple[int, ...]]] = {}  # type id -> (opname, operands)
        self.type_of_value: dict[int, int] = {}  # result id -> its result type id
        self.global_vars: dict[int, str] = {}  # variable id -> storage class name
        self._fn: list[list[int]] | None = None
        self._fn_vars: list[list[int]] = []
        self._fn_label_at: int | None = None
        self._require_enum("MemoryModel", memory_model)
        self._require_enum("AddressingModel", addressing)

    # -- ids and requirements -------------------------------------------------------------

    def id(self) -> int:
        """A fresh result id (for forward references such as block labels)."""
        i = self._next_id
        self._next_id += 1
        return i

    def capability(self, name: str) -> None:
        """Declare a capability explicitly (most are derived automatically)."""
        self.g.enumerant("Capability", name)  # validate the name
        if name not in self._explicit_caps:
            self._explicit_caps.append(name)

    def extension(self, name: str) -> None:
        if name not in self._extensions:
            self._extensions.append(name)

    def _in_core(self, version: str) -> bool:
        v = version_tuple(version)
        return v is not None and v <= self.version

    def _require(self, caps: Iterable[str], exts: Iterable[str], version: str) -> None:
        caps = tuple(caps)
        if caps:
            self._cap_reqs.append(caps)
        exts = tuple(exts)
        if exts and not self._in_core(version) and not set(exts) & set(self._extensions):
            self._extensions.append(exts[0])

    def _require_enum(self, kind: str, name: str) -> None:
        e = self.g.enumerant(kind, name)
        self._require(e.capabilities, e.extensions, e.version)

    def ext_import(self, name: str) -> int:
        """Id of an OpExtInstImport (one per set)."""
        if name not in self._ext_imports:
            i = self.id()
            self._ext_imports[name] = i
            self._ext_import_of[i] = name
        return self._ext_imports[name]

    # -- the generic emitter --------------------------------------------------------------

    def emit(self, opname: str, *operands: object, result: int | None = None,
             dedupe: bool | None = None) -> int | None:
        """Append one instruction; returns its result id (None if it has none)."""
        ins = self.g.instruction(opname)
        if opname == "OpCapability":
            self.capability(str(operands[0]))
            return None
        if opname == "OpExtension":
            self.extension(str(operands[0]))
            return None
        if opname == "OpExtInstImport":
            return self.ext_import(str(operands[0]))
        if opname == "OpMemoryModel":
            self._memory_model = (str(operands[0]), str(operands[1]))
            self._require_enum("AddressingModel", str(operands[0]))
            self._require_enum("MemoryModel", str(operands[1]))
            return None
        if opname == "OpEntryPoint":
            model, fn, name, *iface = operands
            self._require_enum("ExecutionModel", str(model))
            self._entry_points.append((str(model), _as_id(fn), str(name),
                                       [_as_id(x) for x in iface] if iface else None))
            return None
        self._require(ins.capabilities, ins.extensions, ins.version)
        is_global = ins.cls in _GLOBAL_CLASSES
        if dedupe is None:
            dedupe = is_global
        words = self._encode(ins, list(operands))
        res: int | None = None
        if ins.has_result:
            key = (opname, tuple(w for w in words if w is not _RESULT))
            if dedupe and key in self._dedupe:
                return self._dedupe[key]
            res = result if result is not None else self.id()
            words = [res if w is _RESULT else w for w in words]
            if dedupe:
                self._dedupe[key] = res
        self._note_result(ins, words, res)
        self._place(ins, words)
        return res

    def _note_result(self, ins: Instruction, words: list[int], res: int | None) -> None:
        if res is None:
            return
        if ins.cls == "Type-Declaration":
            ops = tuple(words[1:])
            self.types[res] = (ins.opname, ops)
            self._type_caps(ins.opname, ops)
        elif ins.has_result_type:
            self.type_of_value[res] = words[0]

    def _place(self, ins: Instruction, words: list[int]) -> None:
        code = [((len(words) + 1) << 16) | ins.opcode, *words]
        name = ins.opname
        if name in ("OpExecutionMode", "OpExecutionModeId"):
            self._exec_modes.append(code)
        elif ins.cls == "Debug" and name not in ("OpLine", "OpNoLine"):
            self._debug.append(code)
        elif ins.cls == "Annotation":
            if tuple(code) not in self._annotation_keys:  # a repeated decoration is invalid
                self._annotation_keys.add(tuple(code))
                self._annotations.append(code)
        elif name == "OpVariable" and words[2] == self._storage_class("Function"):
            if self._fn is None:
                raise ValueError("Function-storage OpVariable outside a function")
            self._fn_vars.append(code)  # hoisted to the entry block at OpFunctionEnd
        elif ins.cls in _GLOBAL_CLASSES or name == "OpVariable" or (
            name == "OpUndef" and self._fn is None
        ):
            if name == "OpVariable":
                self.global_vars[words[1]] = self.g.kind("StorageClass").by_value(words[2]).name
            self._globals.append(code)
        elif name == "OpFunction":
            self._fn, self._fn_vars, self._fn_label_at = [code], [], None
        elif self._fn is None:
            raise ValueError(f"{name} emitted outside a function")
        else:
            self._fn.append(code)
            if name == "OpLabel" and self._fn_label_at is None:
                self._fn_label_at = len(self._fn)
            if name == "OpFunctionEnd":
                at = self._fn_label_at or 1
                self._fn[at:at] = self._fn_vars
                self._functions.append(self._fn)
                self._fn = None

    def _storage_class(self, name: str) -> int:
        return self.g.enumerant("StorageClass", name).value

    # -- operand encoding -----------------------------------------------------------------

    def _encode(self, ins: Instruction, ops: list) -> list:
        out: list = []
        pos = 0
        ctx: dict = {}
        for spec in ins.operands:
            if spec.kind == "IdResult":
                out.append(_RESULT)
                continue
            if spec.quantifier == "*":
                while pos < len(ops):
                    pos = self._operand(spec.kind, ops, pos, out, ctx)
            elif spec.quantifier == "?":
                if pos < len(ops):
                    pos = self._operand(spec.kind, ops, pos, out, ctx)
            else:
                if pos >= len(ops):
                    raise TypeError(f"{ins.opname}: missing operand {spec.name or spec.kind}")
                pos = self._operand(spec.kind, ops, pos, out, ctx)
            if spec.kind == "IdResultType":
                ctx["type"] = out[-1]
            if spec.kind == "IdRef" and "set" not in ctx and ins.opname == "OpExtInst":
                ctx["set"] = out[-1]
        if pos != len(ops):
            raise TypeError(f"{ins.opname}: {len(ops) - pos} operand(s) too many: {ops[pos:]}")
        return out

    def _operand(self, kind: str, ops: list, pos: int, out: list, ctx: dict) -> int:
        v = ops[pos]
        pos += 1
        if kind in ("IdScope", "IdMemorySemantics") and isinstance(v, str):
            enum_kind = "Scope" if kind == "IdScope" else "MemorySemantics"
            for part in v.split("|"):
                self._require_enum(enum_kind, part.strip())
            u32 = self.emit("OpTypeInt", 32, 0)
            out.append(self.emit("OpConstant", u32, self.g.enum_value(enum_kind, v)))
        elif kind in _ID_KINDS:
            out.append(_as_id(v))
        elif kind == "LiteralString":
            out.extend(_string_words(str(v)))
        elif kind == "LiteralInteger" or kind == "LiteralSpecConstantOpInteger":
            if isinstance(v, str):
                v = self.g.opcode(v)
            out.append(int(v) & 0xFFFFFFFF)
        elif kind == "LiteralFloat":
            out.append(struct.unpack("<I", struct.pack("<f", float(v)))[0])
        elif kind == "LiteralContextDependentNumber":
            out.extend(self._literal_for_type(ctx.get("type"), v))
        elif kind == "LiteralExtInstInteger":
            if isinstance(v, str):
                v = ext_set(self._ext_import_of[ctx["set"]]).opcode(v)
            out.append(int(v))
        elif kind.startswith("Pair"):
            a, b = v if isinstance(v, tuple) else (v, ops[pos])
            if not isinstance(v, tuple):
                pos += 1
            first, second = (("LiteralInteger", "IdRef") if kind == "PairLiteralIntegerIdRef"
                             else ("IdRef", "LiteralInteger") if kind == "PairIdRefLiteralInteger"
                             else ("IdRef", "IdRef"))
            self._operand(first, [a], 0, out, ctx)
            self._operand(second, [b], 0, out, ctx)
        else:
            pos = self._enum_operand(kind, v, ops, pos, out, ctx)
        return pos

    def _enum_operand(self, kind: str, v: object, ops: list, pos: int, out: list,
                      ctx: dict) -> int:
        k = self.g.kind(kind)
        if k.category == "BitEnum":
            names = [] if isinstance(v, int) else (
                [s.strip() for s in v.split("|")] if isinstance(v, str) else list(v))
            value = int(v) if isinstance(v, int) else 0
            for n in names:
                value |= self.g.enumerant(kind, n).value
            out.append(value)
            # Parameters of the set bits follow in increasing bit order.
            for e in sorted({e.value: e for e in k.enumerants.values()}.values(),
                            key=lambda e: e.value):
                if e.value and value & e.value:
                    self._require(e.capabilities, e.extensions, e.version)
                    for p in e.parameters:
                        pos = self._operand(p, ops, pos, out, ctx)
            return pos
        e = self.g.enumerant(kind, v) if isinstance(v, str) else k.by_value(int(v))
        if e is None:
            raise ValueError(f"{v!r} is not a value of {kind}")
        if kind != "Capability":  # a declared capability's own list is what it implies
            self._require(e.capabilities, e.extensions, e.version)
        out.append(e.value)
        for p in e.parameters:
            pos = self._operand(p, ops, pos, out, ctx)
        return pos

    def _literal_for_type(self, type_id: int | None, v: object) -> list[int]:
        if type_id is None or type_id not in self.types:
            raise TypeError("a context-dependent literal needs a known result type")
        op, args = self.types[type_id]
        width = args[0]
        if op == "OpTypeFloat":
            fmt = {16: "<e", 32: "<f", 64: "<d"}.get(width)
            if len(args) > 1:  # bf16 and friends: v is the raw bit pattern
                return [int(v) & 0xFFFF]
            raw = struct.pack(fmt, float(v))  # type: ignore[arg-type]
            raw += b"\0" * (-len(raw) % 4)
            return list(struct.unpack(f"<{len(raw) // 4}I", raw))
        if op == "OpTypeInt":
            iv = int(v)  # type: ignore[call-overload]
            if width <= 32:
                return [iv & ((1 << width) - 1)]
            iv &= (1 << 64) - 1
            return [iv & 0xFFFFFFFF, iv >> 32]
        raise TypeError(f"no literal encoding for {op}")

    # -- capabilities implied by types ----------------------------------------------------

    def narrow_widths(self, type_id: int) -> set[int]:
        """Scalar bit widths below 32 contained in a type (through structs/arrays/vectors)."""
        op, args = self.types.get(type_id, ("", ()))
        if op in ("OpTypeInt", "OpTypeFloat"):
            return {args[0]} if args[0] < 32 else set()
        if op == "OpTypeStruct":
            return set().union(*(self.narrow_widths(m) for m in args)) if args else set()
        if op in ("OpTypeArray", "OpTypeRuntimeArray", "OpTypeVector", "OpTypeMatrix"):
            return self.narrow_widths(args[0])
        return set()

    def _type_caps(self, op: str, args: tuple[int, ...]) -> None:
        if op == "OpTypeFloat" and len(args) == 1:
            if args[0] == 16 and self.arith16:
                self._cap_reqs.append(("Float16",))
            elif args[0] == 64:
                self._cap_reqs.append(("Float64",))
        elif op == "OpTypeInt":
            caps = {8: "Int8", 16: "Int16", 64: "Int64"}
            if args[0] in caps and (self.arith16 or args[0] == 64):
                self._cap_reqs.append((caps[args[0]],))
        elif op == "OpTypePointer":
            sc = self.g.kind("StorageClass").by_value(args[0])
            for w in self.narrow_widths(args[1]):
                cap = _NARROW_STORAGE.get(w, {}).get(sc.name if sc else "")
                if cap:
                    self._cap_reqs.append((cap,))

    def resolved_capabilities(self) -> list[str]:
        """Explicit capabilities plus one capability for every derived requirement."""
        caps = list(self._explicit_caps)
        closure: set[str] = set()

        def add(c: str) -> None:
            if c not in caps:
                caps.append(c)
            closure.update(self.g.capability_implies(c))

        for c in list(caps):
            add(c)
        for req in sorted(self._cap_reqs, key=len):  # singletons first, then "any of" lists
            if not closure & set(req):
                add(next((c for c in req if c not in _KERNEL_ONLY_CAPS), req[0]))
        return caps

    # -- output ---------------------------------------------------------------------------

    def finish(self) -> bytes:
        """The module as bytes (little-endian words); entry-point interfaces auto-filled."""
        if self._fn is not None:
            raise ValueError("finish() with an open function (missing OpFunctionEnd)")
        caps = self.resolved_capabilities()
        for c in caps:
            self._require_enum("Capability", c)  # capability-level extensions
        sections: list[list[int]] = []
        sections += [[(2 << 16) | self.g.opcode("OpCapability"),
                      self.g.enum_value("Capability", c)] for c in caps]
        sections += [self._code("OpExtension", _string_words(e)) for e in self._extensions]
        for name, i in self._ext_imports.items():
            sections.append(self._code("OpExtInstImport", [i, *_string_words(name)]))
        am, mm = self._memory_model
        sections.append(self._code("OpMemoryModel", [self.g.enum_value("AddressingModel", am),
                                                     self.g.enum_value("MemoryModel", mm)]))
        for model, fn, name, iface in self._entry_points:
            if iface is None:
                iface = [v for v, sc in self.global_vars.items()
                         if self.version >= (1, 4) or sc in ("Input", "Output")]
            sections.append(self._code("OpEntryPoint", [self.g.enum_value("ExecutionModel", model),
                                                        fn, *_string_words(name), *iface]))
        sections += self._exec_modes + self._debug + self._annotations + self._globals
        for f in self._functions:
            sections += f
        header = [MAGIC, (self.version[0] << 16) | (self.version[1] << 8), 0, self._next_id, 0]
        words = header + [w for code in sections for w in code]
        return struct.pack(f"<{len(words)}I", *words)

    def _code(self, opname: str, words: list[int]) -> list[int]:
        return [((len(words) + 1) << 16) | self.g.opcode(opname), *words]


class _ResultMarker:
    """Placeholder for the result id while a type/constant is looked up for de-duplication."""

    def __repr__(self) -> str:
        return "<result>"


_RESULT = _ResultMarker()
