"""The one door to the Vulkan loader: lazy import, checked calls, extension entry points.

Importing the `vulkan` package dlopens libvulkan; on a machine without a loader that fails with
an OSError deep inside cffi, which tells the user nothing. Everything in the runtime reaches
Vulkan through this module so that (a) a missing loader becomes `NoVulkanLoaderError` with the
install command, and (b) every failing call becomes `VulkanError` naming the call and the
VkResult (`vkQueueSubmit failed: VK_ERROR_DEVICE_LOST`).

Most of the runtime calls the raw C functions (`lib().vkXxx`) with structs built by `new()`;
the package's Python wrappers hide ownership of nested pointers, and raw calls keep it explicit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from alpha_jit.errors import NoVulkanLoaderError, VulkanError

INSTALL_HINT = (
    "alpha_jit needs a Vulkan loader (libvulkan) and a driver. On Debian/Ubuntu: "
    "`sudo apt-get install libvulkan1 mesa-vulkan-drivers` (Mesa lavapipe runs on the CPU); "
    "on a GPU machine install the vendor driver, which ships its Vulkan ICD."
)

_module: Any = None


def load() -> Any:
    """Import the `vulkan` package once; a missing loader becomes NoVulkanLoaderError."""
    global _module
    if _module is None:
        try:
            import vulkan  # noqa: PLC0415 - deferred so `import alpha_jit` works without Vulkan
        except (OSError, ImportError) as exc:
            raise NoVulkanLoaderError(_no_loader(exc)) from exc
        except Exception as exc:  # cffi raises its own error types for a broken library
            raise NoVulkanLoaderError(_no_loader(exc)) from exc
        _module = vulkan
    return _module


def _no_loader(exc: BaseException) -> str:
    return f"cannot load the Vulkan loader ({exc}). {INSTALL_HINT}"


def ffi() -> Any:
    return load().ffi


def lib() -> Any:
    return load().lib


def new(ctype: str, init: Any = None) -> Any:
    """`ffi.new`: zero-initialised C memory owned by the returned cdata (keep it referenced)."""
    return ffi().new(ctype, init)


def result_name(code: int) -> str:
    """VK_ERROR_DEVICE_LOST for -4, derived from the package's exception table."""
    cls = load().exception_codes.get(code)
    if cls is None:
        return f"VkResult({code})"
    return _exception_name(cls)


def _exception_name(cls: type) -> str:
    # VkErrorDeviceLost -> VK_ERROR_DEVICE_LOST
    words = re.findall(r"[A-Z][a-z0-9]*", cls.__name__)
    return "_".join(w.upper() for w in words)


def _is_vk_exception(exc: BaseException) -> bool:
    mod = load()
    return isinstance(exc, (mod.VkError, mod.VkException))


def check(call_name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)`; a Vulkan failure (exception or negative VkResult) names `call_name`."""
    try:
        out = fn(*args)
    except Exception as exc:
        if isinstance(exc, VulkanError):
            raise
        if _is_vk_exception(exc):
            raise VulkanError(f"{call_name} failed: {_exception_name(type(exc))}") from exc
        raise
    return out


def call(name: str, *args: Any, ok: tuple[int, ...] = (0,)) -> Any:
    """Call the raw C function `lib.<name>`; a VkResult outside `ok` raises VulkanError."""
    fn = getattr(lib(), name)
    out = check(name, fn, *args)
    if isinstance(out, int) and _returns_result(name) and out not in ok:
        raise VulkanError(f"{name} failed: {result_name(out)}")
    return out


_RESULT_FUNCS: dict[str, bool] = {}


def _returns_result(name: str) -> bool:
    if name not in _RESULT_FUNCS:
        fn = getattr(lib(), name)
        _RESULT_FUNCS[name] = "VkResult" in ffi().typeof(fn).result.cname
    return _RESULT_FUNCS[name]


class _Owned(list):
    """A list of cdata items that keeps the C array they point into alive."""

    owner: Any = None


def enumerate_array(name: str, ctype: str, *args: Any) -> list[Any]:
    """The two-call idiom: ask for the count, then fill an array of `ctype`."""
    count = new("uint32_t*")
    call(name, *args, count, ffi().NULL, ok=(0, 5))  # 5 = VK_INCOMPLETE
    arr = new(f"{ctype}[]", max(count[0], 1))
    call(name, *args, count, arr, ok=(0, 5))
    out = _Owned(arr[i] for i in range(count[0]))
    out.owner = arr
    return out


def instance_proc(instance: Any, name: str) -> Any | None:
    """An instance-level extension function, cast to its PFN type, or None if absent."""
    ptr = lib().vkGetInstanceProcAddr(instance, name.encode())
    if ptr == ffi().NULL:
        return None
    return ffi().cast(f"PFN_{name}", ptr)


def device_proc(device: Any, name: str) -> Any | None:
    """A device-level extension function, cast to its PFN type, or None if absent."""
    ptr = lib().vkGetDeviceProcAddr(device, name.encode())
    if ptr == ffi().NULL:
        return None
    return ffi().cast(f"PFN_{name}", ptr)


def make_version(major: int, minor: int, patch: int = 0) -> int:
    return (major << 22) | (minor << 12) | patch


def version_str(v: int) -> str:
    return f"{(v >> 22) & 0x7F}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def cstr(chars: Any) -> str:
    """A fixed-size char array from a Vulkan struct as a Python string."""
    return ffi().string(chars).decode("utf-8", "replace")
