"""Kernel generators, one module per family.

A module may define `FAMILIES = {family: generator function name}` (families beyond the built-in
ones in `generate.py`) and register lowerings for ops of lowering class "kernel"
(`lower.register_kernel_lowering`); `import_all()` imports every module here so that both are
found without a central list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_all() -> list[ModuleType]:
    """Every kernel module of this package, imported."""
    return [importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__)]
