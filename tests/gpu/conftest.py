"""The GPU tests' device: skipped where there is no Vulkan or no bf16 cooperative matrices."""

from __future__ import annotations

import pytest

from alpha_jit.codegen_spirv import coopmat


@pytest.fixture(scope="module")
def caps():
    try:
        from alpha_jit.runtime.device import get_device

        c = get_device().caps
    except Exception as exc:  # noqa: BLE001 - no Vulkan at all
        pytest.skip(f"no Vulkan device: {exc}")
    if not coopmat.supported(c, "bf16n"):
        pytest.skip(f"{c.name} lists no bf16 cooperative matrices")
    return c
