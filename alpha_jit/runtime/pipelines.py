"""Compute pipelines from KernelBinary, checked against the device and cached at two levels.

A pipeline is the driver's compiled form of a SPIR-V module plus its interface: N storage
buffers at set 0 and an optional push-constant range. Compiling is the slow part of a cold first
step, so pipelines are memoised per process by (spec key, SPIR-V hash, device fingerprint), a
cold build shows a progress bar over it (`BuildProgress`), and the driver's VkPipelineCache is
persisted under `$ALPHA_JIT_CACHE_DIR/<fingerprint>/pipeline_cache.bin`: saved after each build
that added pipelines and at exit, dropped and rebuilt from this process's pipelines once it
exceeds `MAX_PIPELINE_CACHE_BYTES`, ignored when the driver rejects it, and never fatal when the
folder cannot be written. (Whether it saves time is the driver's business: NVIDIA stores compiled
code there, lavapipe only a header.) The SPIR-V itself is cached beside it by
`codegen_spirv/disk_cache.py` (raw words + verified JSON metadata, per generator version).
Limits are validated before any Vulkan object exists, so a kernel that cannot run here fails
with its name and the limit instead of a driver crash.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from alpha_jit.codegen_spirv import disk_cache, generate
from alpha_jit.codegen_spirv.disk_cache import atomic_write, cache_dir, cache_root
from alpha_jit.codegen_spirv.kernel import KernelBinary
from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime import vk
from alpha_jit.runtime.capabilities import Capabilities

if TYPE_CHECKING:
    from alpha_jit.runtime.device import Device

__all__ = ["BuildProgress", "Pipeline", "PipelineManager", "atomic_write", "cache_dir",
           "cache_root", "load_cached_spirv", "store_spirv", "validate"]

_COMPUTE_STAGE = 0x20
_STORAGE_BUFFER = 7  # VK_DESCRIPTOR_TYPE_STORAGE_BUFFER
_REQUIRE_FULL_SUBGROUPS = 2  # VK_PIPELINE_SHADER_STAGE_CREATE_REQUIRE_FULL_SUBGROUPS_BIT
MAX_PIPELINE_CACHE_BYTES = 64 << 20  # a driver cache only grows; past this, start it afresh
_BAR_MIN_NEW = 8  # a handful of new pipelines compiles too fast to need a bar
_BAR_DELAY_S = 1.0  # and a bar appears only once the work has taken this long
_NOTE_AFTER_S = 2.0  # builds faster than this need no word about the cache
_noted_cache = False  # the "cached under ..." line is printed once per process


def _fingerprint_or_device(fingerprint: str | None) -> str:
    if fingerprint is not None:
        return fingerprint
    from alpha_jit.runtime.device import get_device

    return get_device().caps.fingerprint()


def load_cached_spirv(key: str, fingerprint: str | None = None) -> bytes | None:
    """Raw SPIR-V stored by `store_spirv` for `key` on a device (default: the current one), or
    None. A plain, unverified blob store kept for the runtime's public API; compiled steps
    do not use it (their kernels go through `codegen_spirv/disk_cache.py`)."""
    path = cache_dir(_fingerprint_or_device(fingerprint)) / "spirv" / f"{key}.spv"
    try:
        return path.read_bytes()
    except OSError:
        return None


def store_spirv(key: str, words: bytes, fingerprint: str | None = None) -> Path:
    """Store raw SPIR-V under `<cache dir>/spirv/<key>.spv` for `load_cached_spirv`."""
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
    if binary.notes.get("full_subgroups") and not (
            caps.compute_full_subgroups and sub is not None and binary.local_size[0] % sub == 0):
        raise AlphaJitError(f"{where}: full subgroups of {sub} lanes required, but the device "
                            f"lacks computeFullSubgroups or the workgroup's x size "
                            f"{binary.local_size[0]} is not a multiple")


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
        # compiles started by `prefetch` or `get_many` and not collected yet (main thread only)
        self._pending: dict[tuple[str, str, str], concurrent.futures.Future] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.dirty = False
        self.cache = self._load_cache()

    def _load_cache(self) -> Any:
        mod = vk.load()
        ffi = vk.ffi()
        try:
            data = self.path.read_bytes()
        except OSError:  # absent, or an unreadable folder: only a lost speed-up
            data = b""
        if len(data) > MAX_PIPELINE_CACHE_BYTES:  # the next save holds only this run's pipelines
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

    def follow_caps(self) -> None:
        """After the device's caps changed (the fragment probe, which needs pipelines, so
        this manager existed before it): the cache file of the final fingerprint, with what
        the driver compiled so far merged in, and the first fingerprint's file removed. Else
        the driver's cache stayed under the pre-probe fingerprint while the kernels and the
        tuned configs went under the final one. The probe's pipelines stay in the memo under
        the old key (nothing asks for them again)."""
        fp = self.device.caps.fingerprint()
        if fp == self.fingerprint:
            return
        assert not self._pending, "follow_caps while compiles use the first cache"
        first, first_path = self.cache, self.path
        self.fingerprint, self.path = fp, cache_dir(fp) / "pipeline_cache.bin"
        self.cache = self._load_cache()
        ffi = vk.ffi()
        try:
            srcs = ffi.new("VkPipelineCache[1]", [first])
            vk.call("vkMergePipelineCaches", self.device.handle, self.cache, 1, srcs)
        finally:
            vk.lib().vkDestroyPipelineCache(self.device.handle, first, ffi.NULL)
        self.dirty = True  # the final file gets what the first one held
        try:  # else read (up to 64 MiB) and merged again at every start
            first_path.unlink(missing_ok=True)
        except OSError:  # a read-only cache folder: only a lost speed-up
            pass

    def key(self, binary: KernelBinary) -> tuple[str, str, str]:
        """Memo key; by the module itself: one spec generated for other caps is another one."""
        return (binary.spec.key(), hashlib.sha256(bytes(binary.words)).hexdigest(),
                self.fingerprint)

    def _submit(self, binary: KernelBinary) -> concurrent.futures.Future | None:
        """The compile of `binary` on the driver threads (started now if new); None when its
        pipeline exists."""
        key = self.key(binary)
        if key in self.pipelines:
            return None
        fut = self._pending.get(key)
        if fut is None:
            validate(binary, self.device.caps)
            if self._pool is None:  # the calls release the GIL; the cache is synchronized
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max(1, min(16, os.cpu_count() or 1)), thread_name_prefix="alpha_jit-compile")
            fut = self._pending[key] = self._pool.submit(self._create, binary)
        return fut

    def prefetch(self, binaries: Sequence[KernelBinary]) -> None:
        """Queue the driver compiles of the new binaries (first queued, first compiled) and
        return: a cold build queues the tuner's candidates, then generates the step's other
        kernels and queues them, so they compile while the tuner times (which needs no CPU).
        `get`/`get_many` collect them, and raise a compile's error there; a binary over a
        device limit is left for them to refuse."""
        for b in binaries:
            try:
                self._submit(b)
            except AlphaJitError:  # over a device limit: `get_many` raises it, in its place
                continue

    def _collect(self, key: tuple[str, str, str], fut: concurrent.futures.Future) -> None:
        """A finished compile into the memo (or its error raised)."""
        try:
            self.pipelines[key] = fut.result()  # in the memo before it leaves `_pending`
        finally:
            self._pending.pop(key, None)
        self.dirty = True
        self.device.stats["pipelines"] += 1

    def get_many(self, binaries: Sequence[KernelBinary], bar: Any = None) -> list[Pipeline]:
        """`get` of each binary, the new ones compiled by the driver on several threads (the
        calls release the GIL; the pipeline cache is internally synchronized): a cold step's
        hundreds of pipelines, or the autotuner's candidates, in a fraction of the time."""
        futures = {}
        for b in binaries:
            key = self.key(b)
            if key not in futures:
                fut = self._submit(b)
                if fut is not None:
                    futures[key] = fut
        failure: BaseException | None = None
        for key, fut in futures.items():  # every one collected, even past a failure: none leaks
            try:
                self._collect(key, fut)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failure = failure or exc
            if bar is not None:
                bar.update(1)
        if failure is not None:
            raise failure
        return [self.pipelines[self.key(b)] for b in binaries]

    def begin_build(self) -> BuildProgress:
        """Start timing a step's build (kernel generation, then `BuildProgress.pipelines`)."""
        return BuildProgress(self)

    def get(self, binary: KernelBinary) -> Pipeline:
        """The pipeline for `binary`, compiled at most once per process and device (waited
        for if prefetched)."""
        found = self.pipelines.get(self.key(binary))
        return found if found is not None else self.get_many([binary])[0]

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
            if binary.notes.get("full_subgroups"):  # no partial subgroup starts (validated)
                stage.flags = _REQUIRE_FULL_SUBGROUPS
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

    def save(self) -> bool:
        """Write the driver's pipeline cache to disk (atomically) if pipelines were added;
        False when it could not be written (warned once per process)."""
        if not self.dirty:
            return True
        ffi = vk.ffi()
        size = vk.new("size_t*")
        vk.call("vkGetPipelineCacheData", self.device.handle, self.cache, size, ffi.NULL)
        buf = ffi.new("char[]", max(size[0], 1))
        vk.call("vkGetPipelineCacheData", self.device.handle, self.cache, size, buf, ok=(0, 5))
        if not disk_cache.writable(self.path):
            return False
        try:
            atomic_write(self.path, bytes(ffi.buffer(buf, size[0])))
        except OSError as exc:  # a read-only or full cache folder costs speed, not correctness
            disk_cache.note_unwritable(self.path, exc)
            return False
        self.dirty = False
        return True

    def destroy(self) -> None:
        dev = self.device.handle
        ffi = vk.ffi()
        lib = vk.lib()
        for key, fut in list(self._pending.items()):  # prefetched, never used: none leaks
            try:
                self._collect(key, fut)
            except Exception:  # noqa: BLE001 - an unused kernel's compile error is moot now
                pass
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
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


class BuildProgress:
    """A step's build made visible. Kernel generation has its own bar in `runtime/step_plan.py`;
    after it the driver compiles every new pipeline (vkCreateComputePipelines), which dominates
    a cold first step on a CPU, so that gets a bar too when it is slow. A slow build that
    generated kernels ends with one line per process saying where they are cached."""

    def __init__(self, manager: PipelineManager):
        self.manager = manager
        self.started = time.perf_counter()
        self.generated_before = generate.COUNTS["generated"]

    def pipelines(self, binaries: Sequence[KernelBinary]) -> list[Pipeline]:
        """The pipeline of each binary, in order, with a progress bar when many are new."""
        mgr = self.manager
        new = len({mgr.key(b) for b in binaries} - mgr.pipelines.keys())
        with tqdm(total=new, desc="alpha_jit: building pipelines", unit="kernel",
                  disable=new < _BAR_MIN_NEW, delay=_BAR_DELAY_S, leave=False,
                  file=sys.stderr) as bar:
            out = mgr.get_many(binaries, bar)
        saved = mgr.save() if new else True  # on disk now: a run killed later still keeps it
        generated = generate.COUNTS["generated"] - self.generated_before
        elapsed = time.perf_counter() - self.started
        if generated and saved and elapsed >= _NOTE_AFTER_S:
            self._note_cached(generated, new, elapsed)
        return out

    def _note_cached(self, generated: int, compiled: int, elapsed: float) -> None:
        global _noted_cache
        folder = cache_dir(self.manager.fingerprint)
        if _noted_cache or not disk_cache.writable(folder):
            return
        _noted_cache = True
        print(f"alpha_jit: built the step in {elapsed:.1f} s ({generated} kernels generated, "
              f"{compiled} pipelines compiled by the driver); the kernels are cached under "
              f"{folder}, so the next run skips generating them", file=sys.stderr, flush=True)
