"""What each Vulkan device can do, queried once, as a frozen record kernels specialise on.

Kernel generators never talk to Vulkan: they read a `Capabilities` (the typed record in
`caps.py`: subgroup size, shared memory, f16/bf16, cooperative-matrix shapes, limits). Its
`fingerprint()` keys every on-disk cache, so a driver update or a different GPU never reuses a
stale pipeline or SPIR-V module. This file fills that record from a live device and owns the
process-wide VkInstance and device selection (`ALPHA_JIT_DEVICE`).
"""

from __future__ import annotations

import atexit
import os
from typing import Any

from alpha_jit.errors import DeviceNotFoundError
from alpha_jit.runtime import vk
from alpha_jit.runtime.caps import Capabilities, CoopMatShape

API_VERSION = (1, 3)  # requested; 1.2 drivers still work (timeline semaphores are core in 1.2)

_DEVICE_TYPES = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
_PREFERENCE = {"discrete": 0, "integrated": 1, "virtual": 2, "cpu": 3, "other": 4}

BF16_FEATURES_STYPE = 1000141000  # VkPhysicalDeviceShaderBfloat16FeaturesKHR (registry, ext 142)
BF16_COMPONENT_TYPE = 1000141000  # VK_COMPONENT_TYPE_BFLOAT16_KHR
_COMPONENT_NAMES = {
    0: "f16", 1: "f32", 2: "f64", 3: "i8", 4: "i16", 5: "i32", 6: "i64",
    7: "u8", 8: "u16", 9: "u32", 10: "u64", BF16_COMPONENT_TYPE: "bf16",
    1000491002: "e4m3", 1000491003: "e5m2",
}
_SCOPE_NAMES = {1: "device", 2: "workgroup", 3: "subgroup", 5: "queue_family"}

# Extensions alpha_jit looks at; `Capabilities.extensions` lists the ones present.
RELEVANT_EXTENSIONS = (
    "VK_KHR_cooperative_matrix", "VK_NV_cooperative_matrix2", "VK_KHR_shader_bfloat16",
    "VK_KHR_shader_float16_int8", "VK_KHR_16bit_storage", "VK_KHR_8bit_storage",
    "VK_KHR_push_descriptor", "VK_KHR_buffer_device_address", "VK_EXT_subgroup_size_control",
    "VK_KHR_timeline_semaphore", "VK_KHR_vulkan_memory_model", "VK_KHR_portability_subset",
    "VK_KHR_shader_integer_dot_product", "VK_EXT_shader_atomic_float", "VK_EXT_memory_budget",
    "VK_KHR_shader_subgroup_extended_types", "VK_KHR_maintenance4",
)

_SUBGROUP_ARITHMETIC_BIT = 0x4
_SUBGROUP_SHUFFLE_BIT = 0x10
_COMPUTE_STAGE_BIT = 0x20


# --- instance -----------------------------------------------------------------------------

_instance_handle: Any = None
_physical: list[Any] | None = None
_caps: list[Capabilities] | None = None


def instance() -> Any:
    """The process-wide VkInstance, created on first use."""
    global _instance_handle
    if _instance_handle is None:
        _instance_handle = _create_instance()
        atexit.register(_destroy_instance)
    return _instance_handle


def _create_instance() -> Any:
    mod = vk.load()
    ffi = vk.ffi()
    available = {vk.cstr(p.extensionName) for p in vk.enumerate_array(
        "vkEnumerateInstanceExtensionProperties", "VkExtensionProperties", ffi.NULL)}
    exts = []
    flags = 0
    if "VK_KHR_portability_enumeration" in available:  # MoltenVK lists devices only with this
        exts.append("VK_KHR_portability_enumeration")
        flags |= mod.VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR
    layers = []
    if os.environ.get("ALPHA_JIT_VALIDATION") == "1":
        layers.append("VK_LAYER_KHRONOS_validation")
    keep = [ffi.new("char[]", s.encode()) for s in exts + layers]
    app_name = ffi.new("char[]", b"alpha_jit")
    app = vk.new("VkApplicationInfo*", {
        "sType": mod.VK_STRUCTURE_TYPE_APPLICATION_INFO, "pApplicationName": app_name,
        "pEngineName": app_name, "apiVersion": vk.make_version(*API_VERSION)})
    ext_arr = ffi.new("char*[]", keep[:len(exts)])
    layer_arr = ffi.new("char*[]", keep[len(exts):])
    info = vk.new("VkInstanceCreateInfo*", {
        "sType": mod.VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, "flags": flags,
        "pApplicationInfo": app, "enabledExtensionCount": len(exts),
        "ppEnabledExtensionNames": ext_arr, "enabledLayerCount": len(layers),
        "ppEnabledLayerNames": layer_arr})
    out = vk.new("VkInstance*")
    vk.call("vkCreateInstance", info, ffi.NULL, out)
    return out[0]


def _destroy_instance() -> None:
    global _instance_handle, _physical, _caps
    if _instance_handle is not None:
        from alpha_jit.runtime import device as _device  # devices must go before the instance

        _device.reset_device()
        vk.lib().vkDestroyInstance(_instance_handle, vk.ffi().NULL)
        _instance_handle = None
        _physical = None
        _caps = None


def physical_devices() -> list[Any]:
    global _physical
    if _physical is None:
        _physical = vk.enumerate_array("vkEnumeratePhysicalDevices", "VkPhysicalDevice",
                                       instance())
    return _physical


def device_extensions(pd: Any) -> set[str]:
    return {vk.cstr(p.extensionName) for p in vk.enumerate_array(
        "vkEnumerateDeviceExtensionProperties", "VkExtensionProperties", pd, vk.ffi().NULL)}


# --- feature chain, shared by the query and by logical-device creation ---------------------

# (struct type, sType constant name, fields alpha_jit uses); each is chained when usable.
_FEATURE_STRUCTS = {
    "v11": ("VkPhysicalDeviceVulkan11Features",
            "VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES",
            ("storageBuffer16BitAccess",)),
    "v12": ("VkPhysicalDeviceVulkan12Features",
            "VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES",
            ("shaderFloat16", "shaderInt8", "storageBuffer8BitAccess", "timelineSemaphore",
             "vulkanMemoryModel", "vulkanMemoryModelDeviceScope", "shaderSubgroupExtendedTypes",
             "scalarBlockLayout", "hostQueryReset", "bufferDeviceAddress")),
    "v13": ("VkPhysicalDeviceVulkan13Features",
            "VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_3_FEATURES",
            ("subgroupSizeControl", "computeFullSubgroups", "maintenance4", "synchronization2")),
    "sgsc": ("VkPhysicalDeviceSubgroupSizeControlFeatures",
             "VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_FEATURES",
             ("subgroupSizeControl", "computeFullSubgroups")),
    "coop": ("VkPhysicalDeviceCooperativeMatrixFeaturesKHR",
             "VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR",
             ("cooperativeMatrix",)),
}
_CORE_FEATURES = ("shaderInt16", "shaderInt64", "shaderFloat64")
_BF16_FIELDS = ("shaderBFloat16Type", "shaderBFloat16DotProduct", "shaderBFloat16CooperativeMatrix")


def _chain_keys(api: tuple[int, int], exts: set[str]) -> list[str]:
    keys = []
    if api >= (1, 2):
        keys += ["v11", "v12"]
    if api >= (1, 3):
        keys.append("v13")
    elif "VK_EXT_subgroup_size_control" in exts:
        keys.append("sgsc")
    if "VK_KHR_cooperative_matrix" in exts:
        keys.append("coop")
    return keys


class FeatureChain:
    """A VkPhysicalDeviceFeatures2 chain; the bf16 struct is raw memory (no cffi type)."""

    def __init__(self, api: tuple[int, int], exts: set[str]):
        mod = vk.load()
        ffi = vk.ffi()
        self.head = vk.new("VkPhysicalDeviceFeatures2*",
                           {"sType": mod.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2})
        self.parts: dict[str, Any] = {}
        prev = self.head
        for key in _chain_keys(api, exts):
            ctype, stype, _ = _FEATURE_STRUCTS[key]
            part = vk.new(ctype + "*", {"sType": getattr(mod, stype)})
            prev.pNext = part
            self.parts[key] = part
            prev = part
        self.bf16: Any = None
        if "VK_KHR_shader_bfloat16" in exts:
            # sType, pad, pNext, then three VkBool32: 32 bytes, 8-byte aligned.
            self.bf16 = ffi.new("uint64_t[4]")
            base = ffi.cast("VkBaseOutStructure*", self.bf16)
            base.sType = BF16_FEATURES_STYPE
            prev.pNext = base

    def bf16_words(self) -> Any:
        return vk.ffi().cast("uint32_t*", self.bf16)

    def read(self) -> dict[str, bool]:
        """Every field alpha_jit uses, as supported (after vkGetPhysicalDeviceFeatures2)."""
        out = {f: bool(getattr(self.head.features, f)) for f in _CORE_FEATURES}
        for key, part in self.parts.items():
            for f in _FEATURE_STRUCTS[key][2]:
                out[f] = out.get(f, False) or bool(getattr(part, f))
        if self.bf16 is not None:
            words = self.bf16_words()
            for i, f in enumerate(_BF16_FIELDS):
                out[f] = bool(words[4 + i])
        return out

    def enable(self, supported: dict[str, bool]) -> None:
        """Set exactly the used fields the device supports (nothing else, e.g. robustness)."""
        for f in _CORE_FEATURES:
            setattr(self.head.features, f, int(supported.get(f, False)))
        for key, part in self.parts.items():
            for f in _FEATURE_STRUCTS[key][2]:
                setattr(part, f, int(supported.get(f, False)))
        if self.bf16 is not None:
            words = self.bf16_words()
            for i, f in enumerate(_BF16_FIELDS):
                words[4 + i] = int(supported.get(f, False))


def query_features(pd: Any, api: tuple[int, int], exts: set[str]) -> dict[str, bool]:
    chain = FeatureChain(api, exts)
    vk.lib().vkGetPhysicalDeviceFeatures2(pd, chain.head)
    return chain.read()


# --- capability query ----------------------------------------------------------------------

def _api_tuple(version: int) -> tuple[int, int]:
    return ((version >> 22) & 0x7F, (version >> 12) & 0x3FF)


def _driver_version_str(vendor: int, v: int) -> str:
    if vendor == 0x10DE:  # NVIDIA packs 10.8.8.6 bits
        return f"{(v >> 22) & 0x3FF}.{(v >> 14) & 0xFF}.{(v >> 6) & 0xFF}.{v & 0x3F}"
    return vk.version_str(v)


def _cooperative_matrix(pd: Any) -> tuple[CoopMatShape, ...]:
    fn = vk.instance_proc(instance(), "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR")
    if fn is None:
        return ()
    mod = vk.load()
    count = vk.new("uint32_t*")
    vk.check("vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR", fn, pd, count, vk.ffi().NULL)
    arr = vk.new("VkCooperativeMatrixPropertiesKHR[]", max(count[0], 1))
    for i in range(count[0]):
        arr[i].sType = mod.VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_KHR
    vk.check("vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR", fn, pd, count, arr)

    def name(t: int) -> str:
        return _COMPONENT_NAMES.get(t, str(t))

    return tuple(
        CoopMatShape(p.MSize, p.NSize, p.KSize, name(p.AType), name(p.BType), name(p.CType),
                     name(p.ResultType), _SCOPE_NAMES.get(p.scope, str(p.scope)))
        for p in (arr[i] for i in range(count[0])))


def compute_queue_family(pd: Any) -> tuple[int, bool]:
    """(index, has timestamps) of the first queue family with compute."""
    families = vk.new("uint32_t*")
    vk.lib().vkGetPhysicalDeviceQueueFamilyProperties(pd, families, vk.ffi().NULL)
    arr = vk.new("VkQueueFamilyProperties[]", families[0])
    vk.lib().vkGetPhysicalDeviceQueueFamilyProperties(pd, families, arr)
    for i in range(families[0]):
        if arr[i].queueFlags & vk.load().VK_QUEUE_COMPUTE_BIT:
            return i, arr[i].timestampValidBits > 0
    return -1, False


def query(index: int, pd: Any) -> Capabilities:
    """Read properties, limits, features and extensions of one physical device."""
    mod = vk.load()
    exts = device_extensions(pd)
    base = vk.new("VkPhysicalDeviceProperties*")
    vk.lib().vkGetPhysicalDeviceProperties(pd, base)
    api = _api_tuple(base.apiVersion)

    props = vk.new("VkPhysicalDeviceProperties2*",
                   {"sType": mod.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2})
    subgroup = vk.new("VkPhysicalDeviceSubgroupProperties*",
                      {"sType": mod.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES})
    props.pNext = subgroup
    sgsc = driver = None
    if api >= (1, 3) or "VK_EXT_subgroup_size_control" in exts:
        sgsc = vk.new("VkPhysicalDeviceSubgroupSizeControlProperties*", {
            "sType": mod.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_PROPERTIES})
        subgroup.pNext = sgsc
    if api >= (1, 2):
        driver = vk.new("VkPhysicalDeviceDriverProperties*",
                        {"sType": mod.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES})
        (sgsc if sgsc is not None else subgroup).pNext = driver
    floats = None
    if api >= (1, 2):
        floats = vk.new("VkPhysicalDeviceFloatControlsProperties*", {
            "sType": mod.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FLOAT_CONTROLS_PROPERTIES})
        driver.pNext = floats
    vk.lib().vkGetPhysicalDeviceProperties2(pd, props)
    p = props.properties
    lim = p.limits

    feats = query_features(pd, api, exts)
    _, timestamps = compute_queue_family(pd)
    sg = subgroup.subgroupSize
    return Capabilities(
        index=index,
        name=vk.cstr(p.deviceName),
        device_type=_DEVICE_TYPES.get(p.deviceType, "other"),
        vendor_id=p.vendorID,
        device_id=p.deviceID,
        api_version=vk.version_str(p.apiVersion),
        driver_version=_driver_version_str(p.vendorID, p.driverVersion),
        driver_name=(vk.cstr(driver.driverName) + " " + vk.cstr(driver.driverInfo)).strip()
        if driver is not None else "",
        float16=feats.get("shaderFloat16", False),
        int8=feats.get("shaderInt8", False),
        int16=feats.get("shaderInt16", False),
        int64=feats.get("shaderInt64", False),
        storage_buffer_16bit=feats.get("storageBuffer16BitAccess", False),
        storage_buffer_8bit=feats.get("storageBuffer8BitAccess", False),
        bfloat16=feats.get("shaderBFloat16Type", False),
        cooperative_matrix=_cooperative_matrix(pd)
        if feats.get("cooperativeMatrix", False) else (),
        subgroup_size=sg,
        min_subgroup_size=sgsc.minSubgroupSize if sgsc is not None else sg,
        max_subgroup_size=sgsc.maxSubgroupSize if sgsc is not None else sg,
        subgroup_size_control=feats.get("subgroupSizeControl", False),
        compute_full_subgroups=feats.get("computeFullSubgroups", False),
        subgroup_arithmetic=bool(subgroup.supportedOperations & _SUBGROUP_ARITHMETIC_BIT
                                 and subgroup.supportedStages & _COMPUTE_STAGE_BIT),
        subgroup_shuffle=bool(subgroup.supportedOperations & _SUBGROUP_SHUFFLE_BIT
                              and subgroup.supportedStages & _COMPUTE_STAGE_BIT),
        vulkan_memory_model=feats.get("vulkanMemoryModel", False),
        max_shared_memory=lim.maxComputeSharedMemorySize,
        max_workgroup_invocations=lim.maxComputeWorkGroupInvocations,
        max_workgroup_size=tuple(lim.maxComputeWorkGroupSize),
        max_workgroup_count=tuple(lim.maxComputeWorkGroupCount),
        max_storage_buffer_range=lim.maxStorageBufferRange,
        max_push_constants_size=lim.maxPushConstantsSize,
        max_storage_buffers_per_stage=lim.maxPerStageDescriptorStorageBuffers,
        min_storage_buffer_offset_alignment=lim.minStorageBufferOffsetAlignment,
        max_memory_allocation_size=_max_allocation(pd, api),
        timestamp_period=float(lim.timestampPeriod),
        timestamp_compute=timestamps,
        extensions=tuple(e for e in RELEVANT_EXTENSIONS if e in exts),
        inf_nan_preserve_f32=bool(floats.shaderSignedZeroInfNanPreserveFloat32)
        if floats is not None else False,
        denorm_preserve_f32=bool(floats.shaderDenormPreserveFloat32)
        if floats is not None else False,
    )


def _max_allocation(pd: Any, api: tuple[int, int]) -> int:
    if api < (1, 1):
        return 1 << 30
    mod = vk.load()
    props = vk.new("VkPhysicalDeviceProperties2*",
                   {"sType": mod.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2})
    m3 = vk.new("VkPhysicalDeviceMaintenance3Properties*",
                {"sType": mod.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES})
    props.pNext = m3
    vk.lib().vkGetPhysicalDeviceProperties2(pd, props)
    return int(m3.maxMemoryAllocationSize)


def enumerate_devices() -> list[Capabilities]:
    """Capabilities of every Vulkan device, in the driver's enumeration order (cached)."""
    global _caps
    if _caps is None:
        _caps = [query(i, pd) for i, pd in enumerate(physical_devices())]
    return list(_caps)


def select_device(devices: list[Capabilities] | None = None) -> Capabilities:
    """Honour ALPHA_JIT_DEVICE=<index|name substring>; else discrete > integrated > cpu."""
    devices = enumerate_devices() if devices is None else devices
    found = "; ".join(f"{d.index}: {d.name}" for d in devices) or "none"
    if not devices:
        raise DeviceNotFoundError(f"no Vulkan device found. {vk.INSTALL_HINT}")
    want = os.environ.get("ALPHA_JIT_DEVICE", "").strip()
    if want:
        if want.isdigit():
            for d in devices:
                if d.index == int(want):
                    return d
        else:
            for d in devices:
                if want.lower() in d.name.lower():
                    return d
        raise DeviceNotFoundError(
            f"ALPHA_JIT_DEVICE={want!r} matches no Vulkan device; found: {found}")
    return min(devices, key=lambda d: (_PREFERENCE.get(d.device_type, 9), d.index))
