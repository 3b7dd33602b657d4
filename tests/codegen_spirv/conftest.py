"""Shared helpers: validation of every module, and execution on the Vulkan runtime if present."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from alpha_jit.codegen_spirv import tools


def validate(words: bytes, name: str = "test") -> None:
    tools.validate(words, name, target_env="vulkan1.2")


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert not np.isnan(got).any(), "NaN in kernel output"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _runtime():
    if importlib.util.find_spec("alpha_jit.runtime.testing") is None:
        return None
    try:
        from alpha_jit.runtime import testing
    except Exception:  # noqa: BLE001 - runtime still being written, or no Vulkan loader
        return None
    return testing


@pytest.fixture(scope="session")
def run_kernel():
    """`run_kernel(binary, arrays, out_specs)`; skips when no Vulkan runtime is available."""
    testing = _runtime()
    if testing is None or not hasattr(testing, "run_kernel"):
        pytest.skip("alpha_jit.runtime.testing.run_kernel not available")
    return testing.run_kernel
