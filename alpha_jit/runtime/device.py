"""The logical Vulkan device alpha_jit runs on: one compute queue, one timeline, one of each.

`get_device()` returns the process-wide `Device`, created on first use from `select_device()`
(`ALPHA_JIT_DEVICE`). It owns the queue, a command pool, the timeline semaphore that orders
every submission, the memory heaps and the pipeline cache. Everything the compiled step needs
at run time goes through it: allocate, upload, record, submit, wait, download.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from alpha_jit.codegen_spirv.kernel import KernelBinary
from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime import vk
from alpha_jit.runtime.capabilities import (
    Capabilities,
    FeatureChain,
    compute_queue_family,
    device_extensions,
    enumerate_devices,
    physical_devices,
    query_features,
    select_device,
)
from alpha_jit.runtime.executor import Command, Recording, barrier_entry, barrier_exit, record
from alpha_jit.runtime.memory import BufferRegion, MemoryManager, MiB
from alpha_jit.runtime.pipelines import Pipeline, PipelineManager

__all__ = ["Capabilities", "Device", "enumerate_devices", "get_device", "reset_device",
           "select_device"]

# Device extensions enabled when present (the rest alpha_jit uses are core in 1.2/1.3).
# staging bytes one upload or download holds: bounded, fits the staging heap's first block so
# parameter uploads never grow it (uploads use it as two halves, filled and copied in turn)
TRANSFER_CHUNK = 8 * MiB
_OPTIONAL_EXTENSIONS = ("VK_KHR_cooperative_matrix", "VK_KHR_shader_bfloat16",
                        "VK_KHR_portability_subset", "VK_KHR_push_descriptor")
_UINT64_MAX = (1 << 64) - 1


class Device:
    """A logical device with one compute queue and a timeline semaphore."""

    def __init__(self, caps: Capabilities | None = None):
        caps = select_device() if caps is None else caps
        self.caps = caps
        self.stats: dict[str, int] = {"recordings": 0, "submits": 0, "pipelines": 0,
                                      "memory_blocks": 0, "uploads": 0, "downloads": 0}
        self.handle: Any = None
        self._lock = threading.RLock()  # submit/wait/frees from several threads stay ordered
        self._submits: dict[Any, tuple] = {}  # command buffer -> its reusable submit structs
        self._recordings: weakref.WeakSet[Recording] = weakref.WeakSet()
        self.last_submitted = 0  # the highest timeline value a successful submit will signal
        # seconds the driver's vkQueueSubmit took in the last submit: its share of host time
        self.last_submit_s = 0.0
        self._completed = 0
        self._counter = vk.new("uint64_t*")  # the spinning wait's reads
        self._spin_s = wait_spin_s(caps)
        self.physical = physical_devices()[caps.index]
        self._create()
        self.memory = MemoryManager(self)
        self.pipelines = PipelineManager(self)
        if caps.cooperative_matrix and not caps.fragment_layouts:
            self.caps = dataclasses.replace(caps, fragment_layouts=self._probe_fragments())
            self.pipelines.follow_caps()

    # --- creation ------------------------------------------------------------------------

    def _create(self) -> None:
        mod = vk.load()
        ffi = vk.ffi()
        pd = self.physical
        exts = device_extensions(pd)
        api = tuple(int(x) for x in self.caps.api_version.split(".")[:2])
        supported = query_features(pd, api, exts)
        if not supported.get("timelineSemaphore"):
            raise AlphaJitError(f"{self.caps.name} lacks timeline semaphores (Vulkan 1.2); "
                                "alpha_jit needs them to track submissions")
        chain = FeatureChain(api, exts)
        chain.enable(supported)
        self.features = {k: v for k, v in supported.items() if v}

        family, _ = compute_queue_family(pd)
        if family < 0:
            raise AlphaJitError(f"{self.caps.name} has no compute queue")
        self.queue_family = family
        priority = vk.new("float*", 1.0)
        qinfo = vk.new("VkDeviceQueueCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
            "queueFamilyIndex": family, "queueCount": 1, "pQueuePriorities": priority})
        enabled = [e for e in _OPTIONAL_EXTENSIONS if e in exts]
        if api < (1, 3) and "VK_EXT_subgroup_size_control" in exts:
            enabled.append("VK_EXT_subgroup_size_control")
        names = [ffi.new("char[]", e.encode()) for e in enabled]
        name_arr = ffi.new("char*[]", names)
        info = vk.new("VkDeviceCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, "pNext": chain.head,
            "queueCreateInfoCount": 1, "pQueueCreateInfos": qinfo,
            "enabledExtensionCount": len(enabled), "ppEnabledExtensionNames": name_arr})
        out = vk.new("VkDevice*")
        vk.call("vkCreateDevice", pd, info, ffi.NULL, out)
        self.handle = out[0]
        self.enabled_extensions = tuple(enabled)

        q = vk.new("VkQueue*")
        vk.lib().vkGetDeviceQueue(self.handle, family, 0, q)
        self.queue = q[0]
        pool_info = vk.new("VkCommandPoolCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
            "flags": mod.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
            "queueFamilyIndex": family})
        pool = vk.new("VkCommandPool*")
        vk.call("vkCreateCommandPool", self.handle, pool_info, ffi.NULL, pool)
        self.command_pool = pool[0]
        type_info = vk.new("VkSemaphoreTypeCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO,
            "semaphoreType": mod.VK_SEMAPHORE_TYPE_TIMELINE, "initialValue": 0})
        sem_info = vk.new("VkSemaphoreCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO, "pNext": type_info})
        sem = vk.new("VkSemaphore*")
        vk.call("vkCreateSemaphore", self.handle, sem_info, ffi.NULL, sem)
        self.timeline = sem[0]
        self.memory_properties = vk.new("VkPhysicalDeviceMemoryProperties*")
        vk.lib().vkGetPhysicalDeviceMemoryProperties(pd, self.memory_properties)

    def _probe_fragments(self) -> tuple:
        """Where the device keeps fragment elements (kernels that take fragments apart need
        it); a probe that fails leaves it unknown, and those kernels keep their shared-memory
        variant."""
        from alpha_jit.codegen_spirv.fragments import probe

        try:
            return probe(self)
        except Exception as e:  # noqa: BLE001 - any driver failure: the kernels do not need it
            warnings.warn(f"probing cooperative-matrix fragment layouts on {self.caps.name} "
                          f"failed ({e}); attention keeps its shared-memory softmax",
                          stacklevel=3)
            return ()

    def __repr__(self) -> str:
        return f"Device({self.caps.summary()})"

    # --- memory -----------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> BufferRegion:
        """A device-local region of `nbytes`."""
        return self.memory.alloc(nbytes)

    def alloc_staging(self, nbytes: int) -> BufferRegion:
        """A host-visible, mapped region (upload source or readback target)."""
        return self.memory.alloc_staging(nbytes)

    def free(self, region: BufferRegion, after_value: int | None = None) -> None:
        """Free once the timeline passes `after_value` (None: after all work submitted)."""
        with self._lock:
            self.memory.free(region, after_value)

    def upload(self, region: BufferRegion, data: np.ndarray | bytes, offset: int = 0) -> None:
        """Synchronously copy host data into a (device-local) region at `offset`
        (`upload_many`'s streaming through bounded staging)."""
        raw = _as_bytes_view(data)
        if raw.nbytes == 0:
            return
        if offset + raw.nbytes > region.size:
            raise AlphaJitError(f"upload of {raw.nbytes} bytes at {offset} into a region of "
                                f"{region.size} bytes")
        self._stream([(region, offset, raw)])
        self.stats["uploads"] += 1

    def upload_many(self, items: Sequence[tuple[BufferRegion, np.ndarray | bytes]]) -> None:
        """Synchronously copy each host buffer to the start of its region. Everything streams
        through one staging region of at most TRANSFER_CHUNK bytes (a staging block sized for
        the largest tensor, GPT-2's 155 MB embedding, would stay held after the upload), used
        as two halves: the host fills one while the GPU copies out of the other, and small
        buffers share a half (one submit for many LayerNorm weights)."""
        views = [(r, _as_bytes_view(d)) for r, d in items]
        for r, raw in views:
            if raw.nbytes > r.size:
                raise AlphaJitError(f"upload of {raw.nbytes} bytes into a region of {r.size} "
                                    "bytes")
        self._stream([(r, 0, raw) for r, raw in views])
        self.stats["uploads"] += len(views)

    def _stream(self, items: list[tuple[BufferRegion, int, memoryview]]) -> None:
        """Copy (region, offset, bytes) items through the two staging halves; returns once
        every copy is done."""
        total = sum(raw.nbytes for _, _, raw in items)
        if total == 0:
            return
        size = min(total, TRANSFER_CHUNK)
        half = max(TRANSFER_CHUNK // 2, 1)
        halves = [(0, min(size, half))] + ([(half, size - half)] if size > half else [])
        staging = self.alloc_staging(size)
        cbs: list[Any] = [None] * len(halves)  # one command buffer per half, re-recorded
        done_at = [0] * len(halves)  # timeline value of the last copy out of each half
        cur, used = 0, 0  # the half being filled and its bytes so far
        copies: list[tuple[BufferRegion, int, int, int]] = []  # (dst, dst offset, src off, n)

        def flush() -> None:
            nonlocal cur, used
            if cbs[cur] is None:
                cbs[cur] = self.allocate_command_buffer()
            done_at[cur] = self.submit_command_buffer(self._record_copies(cbs[cur], staging,
                                                                          copies))
            copies.clear()
            cur, used = (cur + 1) % len(halves), 0

        try:
            for region, offset, raw in items:
                lo = 0
                while lo < raw.nbytes:
                    base, cap = halves[cur]
                    if used == 0:  # the copy that last read this half must be done
                        self.wait(done_at[cur])
                    n = min(cap - used, raw.nbytes - lo)
                    staging.write(raw[lo:lo + n], base + used)
                    copies.append((region, offset + lo, base + used, n))
                    used, lo = used + n, lo + n
                    if used == cap:
                        flush()
            if copies:
                flush()
        finally:
            try:  # also after an error mid-way: no copy may still read staging or a buffer
                self.wait(max(done_at))
            finally:
                for cb in cbs:
                    if cb is not None:
                        self.free_command_buffer(cb)
                self.free(staging)

    def _record_copies(self, cb: Any, staging: BufferRegion,
                       copies: list[tuple[BufferRegion, int, int, int]]) -> Any:
        """Record staging -> region copies between full barriers into `cb` (reset by begin)."""
        lib = vk.lib()

        def commands(cb: Any) -> None:
            for dst, dst_off, src_off, n in copies:
                region = vk.new("VkBufferCopy*", {"srcOffset": staging.offset + src_off,
                                                  "dstOffset": dst.offset + dst_off, "size": n})
                lib.vkCmdCopyBuffer(cb, staging.buffer, dst.buffer, 1, region)

        return self._record_one_time(cb, commands)

    def download(self, region: BufferRegion, nbytes: int | None = None, offset: int = 0) -> bytes:
        """Synchronously read `nbytes` of a region back to the host through staging (chunked
        as `upload` is)."""
        n = region.size - offset if nbytes is None else nbytes
        if n <= 0 or offset + n > region.size:
            raise AlphaJitError(f"download of {n} bytes at {offset} from a region of "
                                f"{region.size} bytes")
        out = bytearray(n)
        staging = self.alloc_staging(min(n, TRANSFER_CHUNK))
        try:
            for lo in range(0, n, TRANSFER_CHUNK):
                m = min(TRANSFER_CHUNK, n - lo)
                self._one_off_copy(region, offset + lo, staging, 0, m)
                out[lo:lo + m] = staging.read(m)
        finally:
            self.free(staging)
        self.stats["downloads"] += 1
        return bytes(out)

    def download_array(self, region: BufferRegion, shape: Sequence[int],
                       dtype: np.dtype | type) -> np.ndarray:
        """`download` straight into a new numpy array of `shape` and `dtype`."""
        out = np.empty(tuple(shape), dtype=dtype)
        if out.nbytes:
            out[...] = np.frombuffer(self.download(region, out.nbytes), dtype).reshape(out.shape)
        return out

    def fill_zero(self, regions: Sequence[BufferRegion]) -> None:
        """Synchronously zero whole regions on the GPU, one submit for all of them (optimizer
        moments start at zero: two thirds of an AdamW model's state need no upload). Each
        region's size must be a multiple of 4 bytes (vkCmdFillBuffer)."""
        if any(r.size % 4 for r in regions):
            raise AlphaJitError("fill_zero needs regions whose size is a multiple of 4 bytes")
        lib = vk.lib()
        self._one_off(lambda cb: [lib.vkCmdFillBuffer(cb, r.buffer, r.offset, r.size, 0)
                                  for r in regions if r.size])

    def _one_off_copy(self, src: BufferRegion, src_off: int, dst: BufferRegion, dst_off: int,
                      n: int) -> None:
        copy = vk.new("VkBufferCopy*", {"srcOffset": src.offset + src_off,
                                        "dstOffset": dst.offset + dst_off, "size": n})
        self._one_off(lambda cb: vk.lib().vkCmdCopyBuffer(cb, src.buffer, dst.buffer, 1, copy))

    def _one_off(self, commands: Any) -> None:
        """Record `commands(cb)` between full barriers into a one-time command buffer, submit
        it and wait."""
        cb = self.allocate_command_buffer()
        try:
            self.wait(self.submit_command_buffer(self._record_one_time(cb, commands)))
        finally:
            self.free_command_buffer(cb)

    @staticmethod
    def _record_one_time(cb: Any, commands: Any) -> Any:
        """Record `commands(cb)` between full barriers into `cb` for one submit (begin resets
        a command buffer recorded before)."""
        mod = vk.load()
        begin = vk.new("VkCommandBufferBeginInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
            "flags": mod.VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT})
        vk.call("vkBeginCommandBuffer", cb, begin)
        barrier_entry(cb)
        commands(cb)
        barrier_exit(cb)
        vk.call("vkEndCommandBuffer", cb)
        return cb

    # --- pipelines and recordings ---------------------------------------------------------

    def pipeline(self, binary: KernelBinary) -> Pipeline:
        """The compute pipeline for a kernel binary (validated, cached)."""
        return self.pipelines.get(binary)

    def record(self, commands: list[Command], name: str = "step") -> Recording:
        """Record `commands` into one replayable command buffer."""
        return record(self, commands, name)

    def allocate_command_buffer(self) -> Any:
        mod = vk.load()
        info = vk.new("VkCommandBufferAllocateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
            "commandPool": self.command_pool,
            "level": mod.VK_COMMAND_BUFFER_LEVEL_PRIMARY, "commandBufferCount": 1})
        out = vk.new("VkCommandBuffer[1]")
        vk.call("vkAllocateCommandBuffers", self.handle, info, out)
        return out[0]

    # --- timeline ---------------------------------------------------------------------------

    def submit_command_buffer(self, command_buffer: Any) -> int:
        """Submit, signalling the timeline with the next value, and return that value.
        A failed submit raises VulkanError and leaves the counter where it was."""
        with self._lock:
            value = self.last_submitted + 1
            values, info = self._submit_info(command_buffer)
            values[0] = value
            t0 = time.perf_counter()
            self._queue_submit(info)
            self.last_submit_s = time.perf_counter() - t0
            self.last_submitted = value  # only after the driver accepted it
            self.stats["submits"] += 1
            if self.memory.deferred:  # frees whose last use may have passed
                self._collect(self.completed_value(process=False))
            return value

    def _submit_info(self, command_buffer: Any) -> tuple[Any, Any]:
        """The submit structs of a command buffer, built once and reused by every replay (the
        signal value is written in place): building them per call was host time per step."""
        cached = self._submits.get(command_buffer)  # a handle hashes by its address
        if cached is None:
            mod = vk.load()
            values = vk.new("uint64_t[1]", [0])
            timeline_info = vk.new("VkTimelineSemaphoreSubmitInfo*", {
                "sType": mod.VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO,
                "signalSemaphoreValueCount": 1, "pSignalSemaphoreValues": values})
            cbs = vk.new("VkCommandBuffer[1]", [command_buffer])
            sems = vk.new("VkSemaphore[1]", [self.timeline])
            info = vk.new("VkSubmitInfo*", {
                "sType": mod.VK_STRUCTURE_TYPE_SUBMIT_INFO, "pNext": timeline_info,
                "commandBufferCount": 1, "pCommandBuffers": cbs,
                "signalSemaphoreCount": 1, "pSignalSemaphores": sems})
            # the structs point at each other: keep every one alive with the entry
            cached = self._submits[command_buffer] = (values, info, timeline_info, cbs, sems)
        return cached[0], cached[1]

    def forget_command_buffer(self, command_buffer: Any) -> None:
        """Drop the cached submit structs of a freed command buffer."""
        self._submits.pop(command_buffer, None)

    def free_command_buffer(self, command_buffer: Any) -> None:
        """Free a command buffer no submit still uses, and its cached submit structs."""
        self.forget_command_buffer(command_buffer)
        arr = vk.new("VkCommandBuffer[1]", [command_buffer])
        vk.lib().vkFreeCommandBuffers(self.handle, self.command_pool, 1, arr)

    def _queue_submit(self, info: Any) -> None:
        """The one vkQueueSubmit call (a seam for tests that simulate a failing driver)."""
        vk.call("vkQueueSubmit", self.queue, 1, info, vk.ffi().NULL)

    def completed_value(self, process: bool = True) -> int:
        """The timeline value the GPU has reached; also releases frees that became safe."""
        value = vk.new("uint64_t*")
        vk.call("vkGetSemaphoreCounterValue", self.handle, self.timeline, value)
        self._completed = max(self._completed, int(value[0]))
        if process:
            self._collect(self._completed)
        return self._completed

    def wait(self, value: int, timeout_s: float | None = None) -> None:
        """Block until the timeline reaches `value`; TimeoutError after `timeout_s`."""
        if value <= self._completed:  # known reached: no driver call (every replay asks)
            if self.memory.deferred:
                self._collect(self._completed)
            return
        if value > self.last_submitted:
            raise AlphaJitError(f"wait({value}) for a value never submitted "
                                f"(last submitted {self.last_submitted}): it would never come")
        if self._spin_s and self._spin(value, timeout_s):
            return
        mod = vk.load()
        sems = vk.new("VkSemaphore[1]", [self.timeline])
        vals = vk.new("uint64_t[1]", [value])
        info = vk.new("VkSemaphoreWaitInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO, "semaphoreCount": 1,
            "pSemaphores": sems, "pValues": vals})
        ns = _UINT64_MAX if timeout_s is None else max(0, int(timeout_s * 1e9))
        t0 = time.perf_counter()
        res = vk.call("vkWaitSemaphores", self.handle, info, ns, ok=(0, 2))
        if res == 2:  # VK_TIMEOUT
            raise TimeoutError(f"timeline value {value} not reached after "
                               f"{time.perf_counter() - t0:.3f} s on {self.caps.name}")
        self.completed_value(process=True)

    def _spin(self, value: int, timeout_s: float | None) -> bool:
        """Poll the timeline for up to ALPHA_JIT_WAIT_SPIN_MS (as CUDA's default sync spins):
        a thread that slept in the driver's wait comes back to a cold CPU, which cost ~150 us
        of host time on the next call on the H200 host. GPUs only: on a CPU device the
        spinning core is one llvmpipe needs. True when `value` was reached."""
        budget = self._spin_s if timeout_s is None else min(self._spin_s, timeout_s)
        deadline = time.perf_counter() + budget
        read = vk.lib().vkGetSemaphoreCounterValue
        out = self._counter
        while True:
            if read(self.handle, self.timeline, out) == 0 and out[0] >= value:
                self.completed_value(process=True)
                return True
            if time.perf_counter() >= deadline:
                return False

    def synchronize(self) -> None:
        """Wait for everything submitted so far."""
        if self.last_submitted:
            self.wait(self.last_submitted)

    def _collect(self, completed: int) -> None:
        with self._lock:
            self.memory.collect(completed)

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the GPU, then destroy everything this device created."""
        if self.handle is None:
            return
        ffi = vk.ffi()
        lib = vk.lib()
        try:
            lib.vkDeviceWaitIdle(self.handle)
        finally:
            for rec in list(self._recordings):
                rec.release()
            self.pipelines.destroy()
            self.memory.destroy()
            lib.vkDestroySemaphore(self.handle, self.timeline, ffi.NULL)
            lib.vkDestroyCommandPool(self.handle, self.command_pool, ffi.NULL)
            lib.vkDestroyDevice(self.handle, ffi.NULL)
            self.handle = None


def wait_spin_s(caps: Capabilities) -> float:
    """Seconds a wait polls before sleeping in the driver: ALPHA_JIT_WAIT_SPIN_MS, default
    100 ms on GPUs (a step's length: the host is ready when the GPU is), 0 on CPU devices."""
    raw = os.environ.get("ALPHA_JIT_WAIT_SPIN_MS", "").strip()
    if not raw:
        return 0.0 if caps.device_type == "cpu" else 0.1
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not ms >= 0:
        raise AlphaJitError(f"ALPHA_JIT_WAIT_SPIN_MS={raw!r}: give milliseconds >= 0")
    return ms / 1e3


def _as_bytes_view(data: np.ndarray | bytes | bytearray | memoryview) -> memoryview:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")


_device: Device | None = None
_device_lock = threading.Lock()


def get_device() -> Device:
    """The process-wide Device, created on first use (honours ALPHA_JIT_DEVICE)."""
    global _device
    with _device_lock:
        if _device is None:
            _device = Device()
        return _device


def reset_device() -> None:
    """Close the process-wide Device; the next get_device() selects and creates a new one."""
    global _device
    with _device_lock:
        dev, _device = _device, None
    if dev is not None:
        dev.close()


atexit.register(reset_device)  # runs before the instance's atexit (registered earlier = later)
