"""Record a whole step into one command buffer once; replay it with one submit per call.

The plan hands the executor a flat list of commands (copies, dispatches, barriers). Recording
validates all of them first (binding counts, bounds, alignment), then allocates one descriptor
set per dispatch from a pool owned by the recording, and records a single primary command
buffer. Descriptor sets and push constants are baked in, so a replay costs one vkQueueSubmit:
new input data is written into the same regions and the same commands run again. Each submit
signals the device's timeline semaphore with the next value; the host only waits when it reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from alpha_jit.codegen_spirv.kernel import Dispatch
from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime import vk
from alpha_jit.runtime.memory import BufferRegion
from alpha_jit.runtime.pipelines import Pipeline

if TYPE_CHECKING:
    from alpha_jit.runtime.device import Device

_COMPUTE_BIND_POINT = 1
_STORAGE_BUFFER = 7
_STAGE_COMPUTE = 0x800
_STAGE_TRANSFER = 0x1000
_STAGE_HOST = 0x4000
_STAGE_TOP = 0x1  # timestamps: when the command is reached
_STAGE_BOTTOM = 0x2000  # timestamps: after everything before has finished
_STAGE_ALL = 0x10000
_SHADER_READ = 0x20
_SHADER_WRITE = 0x40
_TRANSFER_READ = 0x800
_TRANSFER_WRITE = 0x1000
_HOST_READ = 0x2000
_HOST_WRITE = 0x4000
_MEMORY_READ = 0x8000
_MEMORY_WRITE = 0x10000


@dataclass
class CopyCmd:
    """vkCmdCopyBuffer of `size` bytes between two regions."""

    src: BufferRegion
    dst: BufferRegion
    size: int
    src_offset: int = 0
    dst_offset: int = 0


@dataclass
class FillCmd:
    """vkCmdFillBuffer: set `size` bytes (multiple of 4) of a region to a 32-bit pattern."""

    dst: BufferRegion
    size: int | None = None  # None: the whole region, rounded down to 4 bytes
    offset: int = 0
    value: int = 0


@dataclass
class DispatchCmd:
    """One dispatch; `buffers[i]` is binding i: a region, or (region, byte offset, byte size)."""

    pipeline: Pipeline
    buffers: list[Union[tuple[BufferRegion, int, int], BufferRegion]]  # noqa: UP007
    dispatch: Dispatch


@dataclass
class BarrierCmd:
    """Global memory barrier: compute/transfer writes before later compute/transfer access."""


@dataclass
class TimestampCmd:
    """Write a GPU timestamp into the recording's query pool (for `alpha-jit profile`).

    "bottom": when every earlier command has finished (an end time). "top": when the command
    stream reaches this point, which after a barrier is when the next dispatch may start; with
    no barrier before it, earlier dispatches may still run (a start time, possibly early)."""

    label: str = ""
    stage: str = "bottom"  # bottom | top


Command = Union[CopyCmd, FillCmd, DispatchCmd, BarrierCmd, TimestampCmd]  # noqa: UP007


def _binding(b: tuple[BufferRegion, int, int] | BufferRegion) -> tuple[BufferRegion, int, int]:
    if isinstance(b, BufferRegion):
        return b, 0, b.size
    return b


def validate(device: Device, commands: list[Command], name: str) -> None:
    """Check every command before anything is recorded; errors name the step and command."""
    caps = device.caps
    # 16 bytes at least: kernels read and write bindings through 16-byte vector views
    align = max(caps.min_storage_buffer_offset_alignment, 16)
    for i, cmd in enumerate(commands):
        where = f"{name}: command {i} ({type(cmd).__name__})"
        if isinstance(cmd, DispatchCmd):
            p = cmd.pipeline
            where += f" kernel {p.name!r}"
            if len(cmd.buffers) != p.n_bindings:
                raise AlphaJitError(f"{where}: {len(cmd.buffers)} buffers given, the kernel "
                                    f"declares {p.n_bindings} bindings")
            for j, b in enumerate(cmd.buffers):
                region, off, size = _binding(b)
                _check_region(region, off, size, f"{where} binding {j}")
                if (region.offset + off) % align:
                    raise AlphaJitError(f"{where} binding {j}: offset {region.offset + off} is "
                                        f"not a multiple of {align}")
                if size > caps.max_storage_buffer_range:
                    raise AlphaJitError(f"{where} binding {j}: {size} bytes exceed "
                                        f"maxStorageBufferRange={caps.max_storage_buffer_range}")
            pc = cmd.dispatch.push_constants
            if len(pc) > p.push_constant_size or len(pc) % 4:
                raise AlphaJitError(f"{where}: {len(pc)} push-constant bytes for a kernel "
                                    f"declaring {p.push_constant_size}")
            limits = caps.max_workgroup_count
            for axis, (n, lim) in enumerate(zip(cmd.dispatch.groups, limits, strict=True)):
                if not 0 <= n <= lim:
                    raise AlphaJitError(f"{where}: groups {tuple(cmd.dispatch.groups)} exceed "
                                        f"maxComputeWorkGroupCount[{axis}]={lim}")
        elif isinstance(cmd, CopyCmd):
            _check_region(cmd.src, cmd.src_offset, cmd.size, where + " src")
            _check_region(cmd.dst, cmd.dst_offset, cmd.size, where + " dst")
        elif isinstance(cmd, FillCmd):
            size = cmd.dst.size - cmd.offset if cmd.size is None else cmd.size
            _check_region(cmd.dst, cmd.offset, size, where)
            if cmd.offset % 4:
                raise AlphaJitError(f"{where}: fill offset must be a multiple of 4")
        elif not isinstance(cmd, (BarrierCmd, TimestampCmd)):
            raise AlphaJitError(f"{where}: unknown command {cmd!r}")


def _check_region(region: BufferRegion, off: int, size: int, where: str) -> None:
    if region.freed:
        raise AlphaJitError(f"{where}: region was freed")
    if size <= 0 or off < 0 or off + size > region.size:
        raise AlphaJitError(f"{where}: range [{off}, {off + size}) outside a region of "
                            f"{region.size} bytes")


def cmd_barrier(cb: Any, src_stage: int, src_access: int, dst_stage: int,
                dst_access: int) -> None:
    mod = vk.load()
    barrier = vk.new("VkMemoryBarrier*", {
        "sType": mod.VK_STRUCTURE_TYPE_MEMORY_BARRIER,
        "srcAccessMask": src_access, "dstAccessMask": dst_access})
    null = vk.ffi().NULL
    vk.lib().vkCmdPipelineBarrier(cb, src_stage, dst_stage, 0, 1, barrier, 0, null, 0, null)


def barrier_all(cb: Any) -> None:
    """Compute/transfer writes -> compute/transfer reads and writes (the BarrierCmd)."""
    cmd_barrier(cb, _STAGE_COMPUTE | _STAGE_TRANSFER, _SHADER_WRITE | _TRANSFER_WRITE,
                _STAGE_COMPUTE | _STAGE_TRANSFER,
                _SHADER_READ | _SHADER_WRITE | _TRANSFER_READ | _TRANSFER_WRITE)


def barrier_entry(cb: Any) -> None:
    """Start of a command buffer: earlier submissions' and host writes become visible."""
    cmd_barrier(cb, _STAGE_ALL | _STAGE_HOST, _MEMORY_WRITE | _HOST_WRITE,
                _STAGE_COMPUTE | _STAGE_TRANSFER,
                _SHADER_READ | _SHADER_WRITE | _TRANSFER_READ | _TRANSFER_WRITE)


def barrier_exit(cb: Any) -> None:
    """End of a command buffer: writes become visible to host reads after the wait."""
    cmd_barrier(cb, _STAGE_COMPUTE | _STAGE_TRANSFER, _SHADER_WRITE | _TRANSFER_WRITE,
                _STAGE_HOST, _HOST_READ | _MEMORY_READ)


@dataclass(eq=False)
class Recording:
    """A recorded primary command buffer, replayable; `submit()` returns its timeline value."""

    device: Device
    name: str
    command_buffer: Any
    descriptor_pool: Any
    commands: list[Command]
    query_pool: Any = None
    timestamp_labels: list[str] = field(default_factory=list)
    last_value: int | None = None
    released: bool = False

    def submit(self) -> int:
        """Queue the recording; a recording still pending from a previous submit waits first."""
        if self.released:
            raise AlphaJitError(f"recording {self.name!r} was released")
        if self.last_value is not None:
            self.device.wait(self.last_value)  # a command buffer cannot be pending twice
        value = self.device.submit_command_buffer(self.command_buffer)
        self.last_value = value
        return value

    def wait(self, timeout_s: float | None = None) -> None:
        if self.last_value is not None:
            self.device.wait(self.last_value, timeout_s)

    def timestamps(self) -> list[tuple[str, float]]:
        """(label, nanoseconds since the first timestamp) from the last completed submit."""
        if self.query_pool is None or not self.timestamp_labels:
            return []
        self.wait()
        n = len(self.timestamp_labels)
        data = vk.new("uint64_t[]", n)
        flags = 0x1 | 0x2  # VK_QUERY_RESULT_64_BIT | WAIT
        vk.call("vkGetQueryPoolResults", self.device.handle, self.query_pool, 0, n, 8 * n,
                data, 8, flags)
        period = self.device.caps.timestamp_period
        return [(label, (data[i] - data[0]) * period)
                for i, label in enumerate(self.timestamp_labels)]

    def release(self) -> None:
        """Free the command buffer and descriptor pool (waits if still pending)."""
        if self.released or self.device.handle is None:
            self.released = True
            return
        self.wait()
        ffi = vk.ffi()
        lib = vk.lib()
        self.device.free_command_buffer(self.command_buffer)
        if self.descriptor_pool is not None:
            lib.vkDestroyDescriptorPool(self.device.handle, self.descriptor_pool, ffi.NULL)
        if self.query_pool is not None:
            lib.vkDestroyQueryPool(self.device.handle, self.query_pool, ffi.NULL)
        self.released = True
        self.device._recordings.discard(self)


def record(device: Device, commands: list[Command], name: str = "step") -> Recording:
    """Validate, then record `commands` into one primary command buffer."""
    commands = list(commands)
    validate(device, commands, name)
    mod = vk.load()
    ffi = vk.ffi()
    lib = vk.lib()
    dev = device.handle
    dispatches = [c for c in commands if isinstance(c, DispatchCmd)]
    n_sets = len(dispatches)
    n_desc = sum(max(c.pipeline.n_bindings, 1) for c in dispatches)
    n_stamps = sum(isinstance(c, TimestampCmd) for c in commands)

    pool = None
    sets: list[Any] = []
    if n_sets:
        size = vk.new("VkDescriptorPoolSize*", {"type": _STORAGE_BUFFER,
                                                "descriptorCount": n_desc})
        info = vk.new("VkDescriptorPoolCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO, "maxSets": n_sets,
            "poolSizeCount": 1, "pPoolSizes": size})
        out = vk.new("VkDescriptorPool*")
        vk.call("vkCreateDescriptorPool", dev, info, ffi.NULL, out)
        pool = out[0]
        layouts = vk.new("VkDescriptorSetLayout[]", [c.pipeline.set_layout for c in dispatches])
        alloc = vk.new("VkDescriptorSetAllocateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO,
            "descriptorPool": pool, "descriptorSetCount": n_sets, "pSetLayouts": layouts})
        set_arr = vk.new("VkDescriptorSet[]", n_sets)
        vk.call("vkAllocateDescriptorSets", dev, alloc, set_arr)
        sets = [set_arr[i] for i in range(n_sets)]
        _write_sets(device, dispatches, sets)

    query_pool = None
    if n_stamps:
        qinfo = vk.new("VkQueryPoolCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO,
            "queryType": mod.VK_QUERY_TYPE_TIMESTAMP, "queryCount": n_stamps})
        qout = vk.new("VkQueryPool*")
        vk.call("vkCreateQueryPool", dev, qinfo, ffi.NULL, qout)
        query_pool = qout[0]

    cb = device.allocate_command_buffer()
    rec = Recording(device, name, cb, pool, commands, query_pool)
    begin = vk.new("VkCommandBufferBeginInfo*", {
        "sType": mod.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO})
    vk.call("vkBeginCommandBuffer", cb, begin)
    if query_pool is not None:
        lib.vkCmdResetQueryPool(cb, query_pool, 0, n_stamps)
    barrier_entry(cb)
    set_index = 0
    for cmd in commands:
        if isinstance(cmd, DispatchCmd):
            p = cmd.pipeline
            lib.vkCmdBindPipeline(cb, _COMPUTE_BIND_POINT, p.handle)
            ds = vk.new("VkDescriptorSet[1]", [sets[set_index]])
            set_index += 1
            lib.vkCmdBindDescriptorSets(cb, _COMPUTE_BIND_POINT, p.layout, 0, 1, ds, 0,
                                        ffi.NULL)
            pc = cmd.dispatch.push_constants
            if pc:
                lib.vkCmdPushConstants(cb, p.layout, 0x20, 0, len(pc), ffi.from_buffer(pc))
            gx, gy, gz = cmd.dispatch.groups
            if gx and gy and gz:
                lib.vkCmdDispatch(cb, gx, gy, gz)
        elif isinstance(cmd, CopyCmd):
            region = vk.new("VkBufferCopy*", {
                "srcOffset": cmd.src.offset + cmd.src_offset,
                "dstOffset": cmd.dst.offset + cmd.dst_offset, "size": cmd.size})
            lib.vkCmdCopyBuffer(cb, cmd.src.buffer, cmd.dst.buffer, 1, region)
        elif isinstance(cmd, FillCmd):
            size = cmd.dst.size - cmd.offset if cmd.size is None else cmd.size
            size -= size % 4
            if size:
                lib.vkCmdFillBuffer(cb, cmd.dst.buffer, cmd.dst.offset + cmd.offset, size,
                                    cmd.value & 0xFFFFFFFF)
        elif isinstance(cmd, BarrierCmd):
            barrier_all(cb)
        elif isinstance(cmd, TimestampCmd):
            stage = _STAGE_TOP if cmd.stage == "top" else _STAGE_BOTTOM
            lib.vkCmdWriteTimestamp(cb, stage, query_pool, len(rec.timestamp_labels))
            rec.timestamp_labels.append(cmd.label)
    barrier_exit(cb)
    vk.call("vkEndCommandBuffer", cb)
    device.stats["recordings"] += 1
    device._recordings.add(rec)
    return rec


def _write_sets(device: Device, dispatches: list[DispatchCmd], sets: list[Any]) -> None:
    """One vkUpdateDescriptorSets call for every binding of every dispatch."""
    mod = vk.load()
    total = sum(c.pipeline.n_bindings for c in dispatches)
    if total == 0:
        return
    infos = vk.new("VkDescriptorBufferInfo[]", total)
    writes = vk.new("VkWriteDescriptorSet[]", total)
    k = 0
    for cmd, ds in zip(dispatches, sets, strict=True):
        for j, b in enumerate(cmd.buffers):
            region, off, size = _binding(b)
            infos[k].buffer = region.buffer
            infos[k].offset = region.offset + off
            infos[k].range = size
            w = writes[k]
            w.sType = mod.VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET
            w.dstSet = ds
            w.dstBinding = j
            w.descriptorCount = 1
            w.descriptorType = _STORAGE_BUFFER
            w.pBufferInfo = infos + k
            k += 1
    vk.lib().vkUpdateDescriptorSets(device.handle, total, writes, 0, vk.ffi().NULL)


def pack_push_constants(fmt: str, *values: Any) -> bytes:
    """struct.pack with little-endian, no padding: what std430 push blocks of scalars expect."""
    return struct.pack("<" + fmt, *values)
