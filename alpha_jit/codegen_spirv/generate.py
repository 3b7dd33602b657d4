"""Kernel generation front door: a KernelSpec plus device capabilities -> KernelBinary.

Maps each kernel family to its generator (written once per family, specialised inside by the
spec and the capabilities) and memoises binaries per (spec key, device fingerprint), so a
retrace that produces the same kernels does not regenerate them. Across processes binaries live
in the verified on-disk cache of `disk_cache.py` (raw SPIR-V + JSON, data only), one
generation per `codegen_version()`.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib
from pathlib import Path
from typing import Any

from alpha_jit.codegen_spirv import disk_cache
from alpha_jit.codegen_spirv.kernel import KernelBinary, KernelSpec
from alpha_jit.ir.ops import registry

_CACHE: dict[tuple[str, str], KernelBinary] = {}
COUNTS: collections.Counter[str] = collections.Counter()  # memory / disk / generated, per process


# family -> (module under kernels/, generator function); imported on first use
_FAMILIES = {
    "elementwise": ("elementwise", "generate_elementwise"),
    "elementwise_multi": ("elementwise", "generate_elementwise_multi"),
    "reduction": ("reduction", "generate_reduction"),
    "matmul": ("matmul", "generate_matmul"),
    "gather": ("gather", "generate_gather"),
    "scatter": ("gather", "generate_scatter"),
}


def _generator(family: str) -> Any:
    if family not in _FAMILIES:  # a family defined by a kernel module's FAMILIES dict
        from alpha_jit.codegen_spirv.kernels import import_all

        for mod in import_all():
            for fam, fn_name in getattr(mod, "FAMILIES", {}).items():
                _FAMILIES.setdefault(fam, (mod.__name__.rsplit(".", 1)[-1], fn_name))
    if family not in _FAMILIES:
        raise KeyError(f"no kernel generator for family {family!r}")
    mod_name, fn_name = _FAMILIES[family]
    mod = importlib.import_module(f"alpha_jit.codegen_spirv.kernels.{mod_name}")
    fn = getattr(mod, fn_name)
    # the IR's registry supplies the scalar rules (a GEMM's epilogue is an elementwise region)
    if family in ("elementwise", "elementwise_multi", "matmul", "norm_dx"):
        return lambda spec, caps: fn(spec, caps, registry.scalar_rule)
    return fn


@functools.lru_cache(maxsize=1)
def codegen_version() -> str:
    """Hash of the code generator's own source: a changed generator never reuses old binaries.
    The ops' scalar rules (ir/ops) and dtypes are part of the generator: elementwise kernels
    are emitted from them."""
    here = Path(__file__).resolve().parent
    pkg = here.parent
    h = hashlib.sha256()
    for f in sorted([*here.glob("*.py"), *here.glob("kernels/*.py"), *pkg.glob("ir/ops/*.py"),
                     pkg / "dtypes.py"]):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def generate(spec: KernelSpec, caps: Any) -> KernelBinary:
    """The binary for `spec` on a device: from memory, from the on-disk cache (written by an
    earlier process for the same device fingerprint and generator version, and verified), or
    freshly generated (and then stored)."""
    fp = caps.fingerprint() if caps is not None else "generic"
    key = (spec.key(), fp)
    binary = _CACHE.get(key)
    if binary is not None:
        COUNTS["memory"] += 1
        return binary
    # without capabilities there is no device to key a disk entry by: memory only
    folder = disk_cache.generation_dir(fp, codegen_version()) if caps is not None else None
    if folder is not None:
        binary = disk_cache.load(spec, folder)
        COUNTS["disk"] += binary is not None
    if binary is None:
        binary = _generator(spec.family)(spec, caps)
        COUNTS["generated"] += 1
        if folder is not None:
            disk_cache.store(binary, folder)
    _CACHE[key] = binary
    return binary
