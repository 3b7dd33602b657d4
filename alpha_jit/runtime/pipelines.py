"""Compute pipelines from KernelBinary, checked against the device and cached at two levels.

A pipeline is the driver's compiled form of a SPIR-V module plus its interface: N storage
buffers at set 0 and an optional push-constant range. Compiling is the slow part of a first
step, so pipelines are memoised per process by (spec key, device fingerprint) and the driver's
VkPipelineCache is persisted under `$ALPHA_JIT_CACHE_DIR/<fingerprint>/pipeline_cache.bin`.
The same directory holds the SPIR-V of every spec (`spirv/<key>.spv`) so a later process can
skip code generation. Limits are validated before any Vulkan object exists, so a kernel that
cannot run here fails with its name and the limit instead of a driver crash.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alpha_jit.codegen_spirv.kernel import KernelBinary
from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime import vk
from alpha_jit.runtime.capabilities import Capabilities

if TYPE_CHECKING:
    from alpha_jit.runtime.device import Device

_COMPUTE_STAGE = 0x20
_STORAGE_BUFFER = 7  # VK_DESCRIPTOR_TYPE_STORAGE_BUFFER


def cache_root() -> Path:
    """`$ALPHA_JIT_CACHE_DIR`, default `~/.cache/alpha_jit`."""
    env = os.environ.get("ALPHA_JIT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "alpha_jit"


def cache_dir(fingerprint: str) -> Path:
    return cache_root() / fingerprint


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fingerprint_or_device(fingerprint: str | None) -> str:
    if fingerprint is not None:
        return fingerprint
    from alpha_jit.runtime.device import get_device

    return get_device().caps.fingerprint()


def load_cached_spirv(key: str, fingerprint: str | None = None) -> bytes | None:
    """SPIR-V stored for spec `key` on this device (default: the current device), or None."""
    path = cache_dir(_fingerprint_or_device(fingerprint)) / "spirv" / f"{key}.spv"
    try:
        return path.read_bytes()
    except OSError:
        return None


def store_spirv(key: str, words: bytes, fingerprint: str | None = None) -> Path:
    """Persist the SPIR-V of spec `key` so a later process can skip generation."""
    path = cache_dir(_fingerprint_or_device(fingerprint)) / "spirv" / f"{key}.spv"
    atomic_write(path, bytes(words))
    return path


def validate(binary: KernelBinary, caps: Capabilities) -> None:
    """Raise AlphaJitError naming the kernel and the limit if the device cannot run it."""
    name = binary.name
    where = f"kernel {name!r} on {caps.name}"
    if len(binary.words) == 0 or len(binary.words) % 4:
        raise AlphaJitError(f"{where}: SPIR-V is {len(binary.words)} bytes, not whole words")
    if len(binary.bindings) > caps.max_storage_buffers_per_stage:
        raise AlphaJitError(
            f"{where}: {len(binary.bindings)} storage buffers exceed "
            f"maxPerStageDescriptorStorageBuffers={caps.max_storage_buffers_per_stage}")
    if binary.push_constant_size > caps.max_push_constants_size:
        raise AlphaJitError(
            f"{where}: {binary.push_constant_size} push-constant bytes exceed "
            f"maxPushConstantsSize={caps.max_push_constants_size}")
    if binary.push_constant_size % 4:
        raise AlphaJitError(f"{where}: push_constant_size {binary.push_constant_size} "
                            "is not a multiple of 4")
    if binary.shared_bytes > caps.max_shared_memory:
        raise AlphaJitError(
            f"{where}: {binary.shared_bytes} bytes of shared memory exceed "
            f"maxComputeSharedMemorySize={caps.max_shared_memory}")
    lx, ly, lz = binary.local_size
    if lx * ly * lz > caps.max_workgroup_invocations:
        raise AlphaJitError(
            f"{where}: local size {binary.local_size} = {lx * ly * lz} invocations exceeds "
            f"maxComputeWorkGroupInvocations={caps.max_workgroup_invocations}")
    for axis, (n, limit) in enumerate(zip(binary.local_size, caps.max_workgroup_size, strict=True)):
        if n > limit:
            raise AlphaJitError(f"{where}: local size {binary.local_size} exceeds "
                                f"maxComputeWorkGroupSize[{axis}]={limit}")
    for i, d in enumerate(binary.dispatches):
        for axis, (n, limit) in enumerate(zip(d.groups, caps.max_workgroup_count, strict=True)):
            if n > limit or n < 0:
                raise AlphaJitError(
                    f"{where}: dispatch {i} groups {tuple(d.groups)} exceed "
                    f"maxComputeWorkGroupCount[{axis}]={limit}")
        if len(d.push_constants) > binary.push_constant_size:
            raise AlphaJitError(
                f"{where}: dispatch {i} has {len(d.push_constants)} push-constant bytes, "
                f"the kernel declares {binary.push_constant_size}")
    sub = binary.notes.get("required_subgroup_size")
    if sub is not None and not (caps.subgroup_size_control
                                and caps.min_subgroup_size <= sub <= caps.max_subgroup_size):
        raise AlphaJitError(
            f"{where}: required subgroup size {sub} not in "
            f"[{caps.min_subgroup_size}, {caps.max_subgroup_size}] or size control missing")


@dataclass(eq=False)
class Pipeline:
    """A compiled kernel and the layout objects needed to bind and push to it."""

    binary: KernelBinary
    handle: Any
    layout: Any
    set_layout: Any
    module: Any

    @property
    def name(self) -> str:
        return self.binary.name

    @property
    def n_bindings(self) -> int:
        return len(self.binary.bindings)

    @property
    def push_constant_size(self) -> int:
        return self.binary.push_constant_size


class PipelineManager:
    """Per-device pipeline memo plus the on-disk VkPipelineCache."""

    def __init__(self, device: Device):
        self.device = device
        self.fingerprint = device.caps.fingerprint()
        self.path = cache_dir(self.fingerprint) / "pipeline_cache.bin"
        self.pipelines: dict[tuple[str, str], Pipeline] = {}
        self.dirty = False
        self.cache = self._load_cache()

    def _load_cache(self) -> Any:
        mod = vk.load()
        ffi = vk.ffi()
        try:
            data = self.path.read_bytes()
        except OSError:
            data = b""
        init = ffi.from_buffer(data) if data else ffi.NULL
        info = vk.new("VkPipelineCacheCreateInfo*", {
            "sType": mod.VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO,
            "initialDataSize": len(data), "pInitialData": init})
        out = vk.new("VkPipelineCache*")
        try:
            vk.call("vkCreatePipelineCache", self.device.handle, info, ffi.NULL, out)
        except Exception:
            # A corrupt or foreign cache file is only a lost speed-up: start empty.
            info.initialDataSize = 0
            info.pInitialData = ffi.NULL
            vk.call("vkCreatePipelineCache", self.device.handle, info, ffi.NULL, out)
        return out[0]

    def get(self, binary: KernelBinary) -> Pipeline:
        """The pipeline for `binary`, compiled at most once per process and device."""
        # keyed by the module itself: one spec generated for other caps is another pipeline
        key = (binary.spec.key(), hashlib.sha256(bytes(binary.words)).hexdigest(),
               self.fingerprint)
        found = self.pipelines.get(key)
        if found is not None:
            return found
        validate(binary, self.device.caps)
        pipeline = self._create(binary)
        self.pipelines[key] = pipeline
        self.dirty = True
        self.device.stats["pipelines"] += 1
        return pipeline

    def _create(self, binary: KernelBinary) -> Pipeline:
        mod = vk.load()
        ffi = vk.ffi()
        dev = self.device.handle
        created: list[tuple[str, Any]] = []  # destroyed in reverse if a later step fails
        try:
            words = bytes(binary.words)
            code = ffi.from_buffer("uint32_t[]", words)
            info = vk.new("VkShaderModuleCreateInfo*", {
                "sType": mod.VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
                "codeSize": len(words), "pCode": code})
            module = vk.new("VkShaderModule*")
            vk.call("vkCreateShaderModule", dev, info, ffi.NULL, module)
            created.append(("vkDestroyShaderModule", module[0]))

            n = len(binary.bindings)
            entries = vk.new("VkDescriptorSetLayoutBinding[]", max(n, 1))
            for i in range(n):
                entries[i].binding = i
                entries[i].descriptorType = _STORAGE_BUFFER
                entries[i].descriptorCount = 1
                entries[i].stageFlags = _COMPUTE_STAGE
            dsl_info = vk.new("VkDescriptorSetLayoutCreateInfo*", {
                "sType": mod.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                "bindingCount": n, "pBindings": entries})
            dsl = vk.new("VkDescriptorSetLayout*")
            vk.call("vkCreateDescriptorSetLayout", dev, dsl_info, ffi.NULL, dsl)
            created.append(("vkDestroyDescriptorSetLayout", dsl[0]))

            pc = vk.new("VkPushConstantRange*", {
                "stageFlags": _COMPUTE_STAGE, "offset": 0, "size": binary.push_constant_size})
            layout_info = vk.new("VkPipelineLayoutCreateInfo*", {
                "sType": mod.VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
                "setLayoutCount": 1, "pSetLayouts": dsl,
                "pushConstantRangeCount": 1 if binary.push_constant_size else 0,
                "pPushConstantRanges": pc})
            layout = vk.new("VkPipelineLayout*")
            vk.call("vkCreatePipelineLayout", dev, layout_info, ffi.NULL, layout)
            created.append(("vkDestroyPipelineLayout", layout[0]))

            entry = ffi.new("char[]", binary.entry_point.encode())
            info = vk.new("VkComputePipelineCreateInfo*", {
                "sType": mod.VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
                "layout": layout[0], "basePipelineIndex": -1})
            stage = info.stage
            stage.sType = mod.VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO
            stage.stage = _COMPUTE_STAGE
            stage.module = module[0]
            stage.pName = entry
            sub = binary.notes.get("required_subgroup_size")
            req = None
            if sub is not None:  # kernels tuned for one subgroup width pin it
                req = vk.new("VkPipelineShaderStageRequiredSubgroupSizeCreateInfo*", {
                    "sType": mod.VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_REQUIRED_SUBGROUP_SIZE_CREATE_INFO,  # noqa: E501
                    "requiredSubgroupSize": sub})
                stage.pNext = req
            out = vk.new("VkPipeline*")
            vk.call("vkCreateComputePipelines", dev, self.cache, 1, info, ffi.NULL, out)
        except Exception as exc:
            for fn, handle in reversed(created):
                getattr(vk.lib(), fn)(dev, handle, ffi.NULL)
            if isinstance(exc, AlphaJitError):
                raise type(exc)(f"building pipeline for kernel {binary.name!r}: {exc}") from exc
            raise
        return Pipeline(binary, out[0], layout[0], dsl[0], module[0])

    def save(self) -> None:
        """Write the driver's pipeline cache to disk (atomically) if pipelines were added."""
        if not self.dirty:
            return
        ffi = vk.ffi()
        size = vk.new("size_t*")
        vk.call("vkGetPipelineCacheData", self.device.handle, self.cache, size, ffi.NULL)
        buf = ffi.new("char[]", max(size[0], 1))
        vk.call("vkGetPipelineCacheData", self.device.handle, self.cache, size, buf, ok=(0, 5))
        try:
            atomic_write(self.path, bytes(ffi.buffer(buf, size[0])))
        except OSError:
            return  # a read-only home directory costs speed, not correctness
        self.dirty = False

    def destroy(self) -> None:
        dev = self.device.handle
        ffi = vk.ffi()
        lib = vk.lib()
        try:
            self.save()
        finally:
            for p in self.pipelines.values():
                lib.vkDestroyPipeline(dev, p.handle, ffi.NULL)
                lib.vkDestroyPipelineLayout(dev, p.layout, ffi.NULL)
                lib.vkDestroyDescriptorSetLayout(dev, p.set_layout, ffi.NULL)
                lib.vkDestroyShaderModule(dev, p.module, ffi.NULL)
            self.pipelines.clear()
            lib.vkDestroyPipelineCache(dev, self.cache, ffi.NULL)
