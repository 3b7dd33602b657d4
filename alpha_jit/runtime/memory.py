"""Device memory: a few large Vulkan allocations carved into aligned regions.

Drivers limit the number of VkDeviceMemory objects (often 4096) and allocation is slow, so the
runtime allocates big blocks (64 MiB, more for big requests) each bound to one VkBuffer, and
hands out `BufferRegion`s: (buffer, offset, size) slices found by a first-fit free list.
Two heaps keep the roles apart even where the memory is the same (lavapipe): device-local
regions for tensors, and host-visible coherent, persistently mapped regions for staging and
readback. A region the GPU may still be using is freed *after* a timeline value: it goes on a
deferred list and returns to the free list only once the device's semaphore has passed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime import vk

if TYPE_CHECKING:
    from alpha_jit.runtime.device import Device

MiB = 1 << 20
DEFAULT_BLOCK_SIZE = 64 * MiB  # few allocations, small enough for an integrated GPU's heap
# staging holds a step's inputs and outputs and bounded upload chunks: a smaller first block
STAGING_BLOCK_SIZE = 16 * MiB
MIN_ALIGNMENT = 256  # keeps every region usable as a descriptor offset on any driver

_BUFFER_USAGE = 0x1 | 0x2 | 0x20  # TRANSFER_SRC | TRANSFER_DST | STORAGE_BUFFER
_DEVICE_LOCAL = 0x1
_HOST_VISIBLE = 0x2
_HOST_COHERENT = 0x4
_HOST_CACHED = 0x8


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(eq=False)
class MemoryBlock:
    """One VkDeviceMemory with one VkBuffer over all of it, and its free list."""

    memory: Any
    buffer: Any
    size: int
    kind: str  # 'device' | 'staging'
    mapped: Any = None  # char* into the mapping for staging blocks
    free_ranges: list[tuple[int, int]] = field(default_factory=list)  # (offset, size), sorted

    def take(self, size: int) -> int | None:
        """First fit; returns the offset or None."""
        for i, (off, sz) in enumerate(self.free_ranges):
            if sz >= size:
                if sz == size:
                    del self.free_ranges[i]
                else:
                    self.free_ranges[i] = (off + size, sz - size)
                return off
        return None

    def give_back(self, offset: int, size: int) -> None:
        """Insert and merge with neighbours so fragments coalesce."""
        ranges = self.free_ranges
        lo, hi = 0, len(ranges)
        while lo < hi:
            mid = (lo + hi) // 2
            if ranges[mid][0] < offset:
                lo = mid + 1
            else:
                hi = mid
        ranges.insert(lo, (offset, size))
        if lo + 1 < len(ranges) and ranges[lo][0] + ranges[lo][1] == ranges[lo + 1][0]:
            ranges[lo] = (ranges[lo][0], ranges[lo][1] + ranges[lo + 1][1])
            del ranges[lo + 1]
        if lo > 0 and ranges[lo - 1][0] + ranges[lo - 1][1] == ranges[lo][0]:
            ranges[lo - 1] = (ranges[lo - 1][0], ranges[lo - 1][1] + ranges[lo][1])
            del ranges[lo]

    @property
    def free_bytes(self) -> int:
        return sum(s for _, s in self.free_ranges)


@dataclass(eq=False)
class BufferRegion:
    """A slice of a block's VkBuffer: what descriptors and copies point at."""

    buffer: Any
    offset: int
    size: int  # bytes requested
    block: MemoryBlock
    reserved: int = 0  # bytes taken from the block (size rounded up to the alignment)
    freed: bool = False

    @property
    def host_visible(self) -> bool:
        return self.block.mapped is not None

    def _ptr(self, offset: int, nbytes: int) -> Any:
        if not self.host_visible:
            raise AlphaJitError("region is device-local; use device.upload/download")
        if self.freed:
            raise AlphaJitError("region was freed")
        if offset < 0 or offset + nbytes > self.size:
            raise AlphaJitError(f"access [{offset}, {offset + nbytes}) outside region of "
                                f"{self.size} bytes")
        return self.block.mapped + self.offset + offset

    def write(self, data: bytes | bytearray | memoryview | np.ndarray, offset: int = 0) -> None:
        """Copy host bytes into a staging region (memory is coherent: no flush needed)."""
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        view = memoryview(data).cast("B")
        vk.ffi().memmove(self._ptr(offset, view.nbytes), view, view.nbytes)

    def host_view(self) -> np.ndarray:
        """The mapped bytes as a writable uint8 array (valid until the region is freed): a
        replayed step writes its inputs by slice assignment, with no call per buffer."""
        return np.frombuffer(vk.ffi().buffer(self._ptr(0, self.size), self.size), np.uint8)

    def read(self, nbytes: int | None = None, offset: int = 0) -> bytes:
        """Copy bytes out of a staging region (after the writing submission was waited on)."""
        n = self.size - offset if nbytes is None else nbytes
        return bytes(vk.ffi().buffer(self._ptr(offset, n), n))

    def read_into(self, out: np.ndarray, offset: int = 0) -> np.ndarray:
        """Read straight into a contiguous numpy array (no intermediate bytes)."""
        flat = out.reshape(-1).view(np.uint8)
        vk.ffi().memmove(flat, self._ptr(offset, flat.nbytes), flat.nbytes)
        return out


class Heap:
    """Blocks of one kind of memory and the sub-allocator over them."""

    def __init__(self, device: Device, kind: str, block_size: int = DEFAULT_BLOCK_SIZE):
        self.device = device
        self.kind = kind
        self.block_size = block_size
        caps = device.caps
        self.alignment = max(caps.min_storage_buffer_offset_alignment, MIN_ALIGNMENT)
        self.max_block = caps.max_memory_allocation_size
        self.blocks: list[MemoryBlock] = []

    def alloc(self, size: int) -> BufferRegion:
        if size <= 0:
            raise AlphaJitError(f"cannot allocate {size} bytes")
        reserved = _round_up(size, self.alignment)
        for block in self.blocks:
            off = block.take(reserved)
            if off is not None:
                return BufferRegion(block.buffer, off, size, block, reserved)
        if reserved > self.max_block:
            raise AlphaJitError(
                f"allocation of {size} bytes exceeds the device's maxMemoryAllocationSize "
                f"({self.max_block} bytes) on {self.device.caps.name}")
        block_size = min(max(self.block_size, _round_up(reserved, MiB)), self.max_block)
        block = self._new_block(block_size)
        self.blocks.append(block)
        off = block.take(reserved)
        assert off is not None
        return BufferRegion(block.buffer, off, size, block, reserved)

    def alloc_many(self, sizes: list[int]) -> list[BufferRegion]:
        """Regions for `sizes` that live together (a step's parameters and optimizer state).
        More than a block's worth go into new blocks sized for them, in order: first fit
        into 64 MiB blocks leaves a tail per block that nothing of theirs fits."""
        reserved = [_round_up(max(s, 1), self.alignment) for s in sizes]
        if sum(reserved) <= self.block_size:
            return [self.alloc(s) for s in sizes]
        out: list[BufferRegion] = []
        try:
            self._pack(sizes, reserved, out)
        except BaseException:
            for r in out:  # nothing half-allocated stays held
                self.release(r)
            self.trim()
            raise
        return out

    def _pack(self, sizes: list[int], reserved: list[int], out: list[BufferRegion]) -> None:
        i = 0
        while i < len(sizes):
            j, total = i, 0
            while j < len(sizes) and total + reserved[j] <= self.max_block:
                total += reserved[j]
                j += 1
            if j == i:  # one region over the device's limit: alloc names it
                out.append(self.alloc(sizes[i]))
                i += 1
                continue
            block = self._new_block(min(_round_up(total, MiB), self.max_block))
            self.blocks.append(block)
            for k in range(i, j):
                off = block.take(reserved[k])
                assert off is not None
                out.append(BufferRegion(block.buffer, off, sizes[k], block, reserved[k]))
            i = j

    def release(self, region: BufferRegion) -> None:
        region.block.give_back(region.offset, region.reserved)

    @property
    def bytes_in_use(self) -> int:
        """Bytes of live regions (deferred frees included, alignment padding too)."""
        return sum(b.size - b.free_bytes for b in self.blocks)

    def _new_block(self, size: int) -> MemoryBlock:
        mod = vk.load()
        ffi = vk.ffi()
        dev = self.device.handle
        info = vk.new("VkBufferCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, "size": size,
            "usage": _BUFFER_USAGE, "sharingMode": mod.VK_SHARING_MODE_EXCLUSIVE})
        buf = vk.new("VkBuffer*")
        vk.call("vkCreateBuffer", dev, info, ffi.NULL, buf)
        req = vk.new("VkMemoryRequirements*")
        vk.lib().vkGetBufferMemoryRequirements(dev, buf[0], req)
        type_index = self._memory_type(req.memoryTypeBits)
        alloc = vk.new("VkMemoryAllocateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
            "allocationSize": req.size, "memoryTypeIndex": type_index})
        mem = vk.new("VkDeviceMemory*")
        try:
            vk.call("vkAllocateMemory", dev, alloc, ffi.NULL, mem)
        except Exception:
            vk.lib().vkDestroyBuffer(dev, buf[0], ffi.NULL)
            raise
        vk.call("vkBindBufferMemory", dev, buf[0], mem[0], 0)
        mapped = None
        if self.kind == "staging":
            ptr = vk.new("void**")
            vk.call("vkMapMemory", dev, mem[0], 0, size, 0, ptr)  # mapped for the block's life
            mapped = ffi.cast("char*", ptr[0])
        self.device.stats["memory_blocks"] += 1
        return MemoryBlock(mem[0], buf[0], size, self.kind, mapped, [(0, size)])

    def _memory_type(self, type_bits: int) -> int:
        """Device: DEVICE_LOCAL (not host-visible if possible). Staging: HOST_VISIBLE|COHERENT,
        CACHED preferred because staging is mostly read back."""
        props = self.device.memory_properties
        types = [(i, props.memoryTypes[i].propertyFlags) for i in range(props.memoryTypeCount)
                 if type_bits & (1 << i)]
        if self.kind == "device":
            prefs = [lambda f: f & _DEVICE_LOCAL and not f & _HOST_VISIBLE,
                     lambda f: f & _DEVICE_LOCAL, lambda f: True]
        else:
            need = _HOST_VISIBLE | _HOST_COHERENT
            prefs = [lambda f: f & need == need and f & _HOST_CACHED,
                     lambda f: f & need == need]
        for pref in prefs:
            for i, flags in types:
                if pref(flags):
                    return i
        raise AlphaJitError(f"no suitable {self.kind} memory type on {self.device.caps.name}")

    def trim(self) -> int:
        """Give every wholly free block back to the driver; returns the bytes given back."""
        idle = [b for b in self.blocks if b.free_bytes == b.size]
        self._destroy(idle)
        self.blocks = [b for b in self.blocks if b not in idle]
        return sum(b.size for b in idle)

    def _destroy(self, blocks: list[MemoryBlock]) -> None:
        dev = self.device.handle
        ffi = vk.ffi()
        for block in blocks:
            if block.mapped is not None:
                vk.lib().vkUnmapMemory(dev, block.memory)
            vk.lib().vkDestroyBuffer(dev, block.buffer, ffi.NULL)
            vk.lib().vkFreeMemory(dev, block.memory, ffi.NULL)

    def destroy(self) -> None:
        self._destroy(self.blocks)
        self.blocks.clear()


class MemoryManager:
    """The device's two heaps plus the frees waiting on the timeline."""

    def __init__(self, device: Device):
        self.device = device
        self.device_heap = Heap(device, "device")
        self.staging_heap = Heap(device, "staging", STAGING_BLOCK_SIZE)
        self.deferred: list[tuple[int, BufferRegion]] = []

    def alloc(self, nbytes: int) -> BufferRegion:
        """Device-local region of `nbytes` (aligned to at least 256 bytes)."""
        return self.device_heap.alloc(nbytes)

    def alloc_many(self, sizes: list[int]) -> list[BufferRegion]:
        """Device-local regions that live together, packed tightly (`Heap.alloc_many`)."""
        return self.device_heap.alloc_many(sizes)

    def alloc_staging(self, nbytes: int) -> BufferRegion:
        """Host-visible, coherent, mapped region for uploads and readbacks."""
        return self.staging_heap.alloc(nbytes)

    def bytes_in_use(self) -> int:
        """Bytes of live regions in both heaps: what a leak test watches."""
        return self.device_heap.bytes_in_use + self.staging_heap.bytes_in_use

    def allocated_bytes(self) -> int:
        """Bytes of every VkDeviceMemory held (both heaps): what the device actually gave."""
        return sum(b.size for h in (self.device_heap, self.staging_heap) for b in h.blocks)

    def free(self, region: BufferRegion, after_value: int | None = None) -> None:
        """Return `region` once the timeline has reached `after_value`.

        None means "after everything submitted so far", the safe default for a caller that
        does not track which submission used the region last."""
        if region.freed:
            raise AlphaJitError("region freed twice")
        region.freed = True
        if after_value is None:
            after_value = self.device.last_submitted
        if after_value <= self.device.completed_value(process=False):
            self._release(region)
        else:
            self.deferred.append((after_value, region))

    def collect(self, completed: int) -> int:
        """Release deferred regions whose value has passed; returns how many."""
        if not self.deferred:
            return 0
        ready = [r for v, r in self.deferred if v <= completed]
        self.deferred = [(v, r) for v, r in self.deferred if v > completed]
        for r in ready:
            self._release(r)
        return len(ready)

    def trim(self) -> int:
        """Return wholly free blocks to the driver (after a burst of scratch allocations, such
        as the GEMM autotuner's, that the step will not reuse); returns the bytes."""
        with self.device._lock:  # submits collect deferred frees under the same lock
            self.collect(self.device.completed_value(process=False))
            return self.device_heap.trim() + self.staging_heap.trim()

    def _release(self, region: BufferRegion) -> None:
        heap = self.staging_heap if region.block.kind == "staging" else self.device_heap
        heap.release(region)

    def destroy(self) -> None:
        self.deferred.clear()
        self.device_heap.destroy()
        self.staging_heap.destroy()
