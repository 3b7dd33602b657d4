"""Vulkan runtime: device selection, memory, pipelines, recorded command buffers.

Nothing here imports the `vulkan` package at import time; the loader is opened on first use
so that `import alpha_jit` works (and errors helpfully) on a machine without Vulkan.
"""

from alpha_jit.runtime.capabilities import Capabilities, enumerate_devices, select_device
from alpha_jit.runtime.device import Device, get_device, reset_device
from alpha_jit.runtime.executor import (
    BarrierCmd,
    CopyCmd,
    DispatchCmd,
    FillCmd,
    Recording,
    TimestampCmd,
)
from alpha_jit.runtime.memory import BufferRegion
from alpha_jit.runtime.pipelines import Pipeline, load_cached_spirv, store_spirv

__all__ = [
    "BarrierCmd", "BufferRegion", "Capabilities", "CopyCmd", "Device", "DispatchCmd", "FillCmd",
    "Pipeline", "Recording", "TimestampCmd", "enumerate_devices", "get_device",
    "load_cached_spirv", "reset_device", "select_device", "store_spirv",
]
