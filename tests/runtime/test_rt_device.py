"""Device enumeration, capabilities, selection, the missing-loader error and checked calls."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

from alpha_jit.errors import DeviceNotFoundError, VulkanError
from alpha_jit.runtime import vk
from alpha_jit.runtime.capabilities import enumerate_devices, select_device


def test_enumerate_capabilities():
    devices = enumerate_devices()
    assert devices, "lavapipe should be present"
    c = devices[0]
    assert c.index == 0 and c.name
    assert c.device_type in {"discrete", "integrated", "virtual", "cpu", "other"}
    assert c.api_version.count(".") == 2 and tuple(map(int, c.api_version.split(".")[:2])) >= (1, 2)
    assert c.subgroup_size >= 1 and c.min_subgroup_size <= c.subgroup_size <= c.max_subgroup_size
    assert c.max_shared_memory >= 16384
    assert len(c.max_workgroup_size) == 3 and len(c.max_workgroup_count) == 3
    assert c.max_workgroup_invocations >= 128
    assert c.max_push_constants_size >= 128
    assert c.max_storage_buffers_per_stage >= 4
    assert c.min_storage_buffer_offset_alignment >= 1
    assert c.max_memory_allocation_size > 0 and c.max_storage_buffer_range > 0
    assert c.timestamp_period > 0
    assert isinstance(c.cooperative_matrix, tuple) and isinstance(c.extensions, tuple)
    for t in c.cooperative_matrix:  # typed shapes (runtime/caps.py: CoopMatShape)
        assert min(t.m, t.n, t.k) >= 1 and t.a and t.b and t.c and t.result and t.scope
    if "llvmpipe" in c.name:  # what DESIGN.md promises about lavapipe
        assert c.device_type == "cpu" and c.float16 and c.storage_buffer_16bit and c.int8
        assert not c.bfloat16 and c.cooperative_matrix == ()
        assert c.max_shared_memory == 32768 and c.subgroup_arithmetic
    fp = c.fingerprint()
    assert fp == c.fingerprint() and len(fp) == 16
    assert dataclasses.replace(c, driver_version="9.9.9").fingerprint() != fp
    assert dataclasses.replace(c, index=5).fingerprint() == fp


def test_select_by_index_and_name(monkeypatch):
    devices = enumerate_devices()
    monkeypatch.setenv("ALPHA_JIT_DEVICE", "0")
    assert select_device() == devices[0]
    word = devices[0].name.split()[0][1:4].upper()  # case-insensitive substring
    monkeypatch.setenv("ALPHA_JIT_DEVICE", word)
    assert select_device() == devices[0]


def test_unknown_device_lists_found(monkeypatch):
    devices = enumerate_devices()
    monkeypatch.setenv("ALPHA_JIT_DEVICE", "no-such-gpu-9000")
    with pytest.raises(DeviceNotFoundError) as err:
        select_device()
    assert "no-such-gpu-9000" in str(err.value)
    assert f"0: {devices[0].name}" in str(err.value)
    monkeypatch.setenv("ALPHA_JIT_DEVICE", "17")
    with pytest.raises(DeviceNotFoundError):
        select_device()


def test_default_preference(monkeypatch):
    monkeypatch.delenv("ALPHA_JIT_DEVICE", raising=False)
    c = enumerate_devices()[0]
    fake = [dataclasses.replace(c, index=0, device_type="cpu"),
            dataclasses.replace(c, index=1, device_type="integrated"),
            dataclasses.replace(c, index=2, device_type="discrete"),
            dataclasses.replace(c, index=3, device_type="discrete")]
    assert select_device(fake).index == 2
    assert select_device(fake[:2]).index == 1
    assert select_device(fake[:1]).index == 0
    with pytest.raises(DeviceNotFoundError):
        select_device([])


def test_missing_loader_gives_install_hint(tmp_path):
    fake = tmp_path / "vulkan"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise OSError(\"cannot load library 'libvulkan.so.1': libvulkan.so.1: cannot open "
        "shared object file: No such file or directory\")\n")
    code = textwrap.dedent("""
        from alpha_jit.errors import NoVulkanLoaderError
        from alpha_jit.runtime.capabilities import enumerate_devices
        try:
            enumerate_devices()
        except NoVulkanLoaderError as e:
            print("OK", e)
        """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.startswith("OK"), out.stdout + out.stderr
    assert "sudo apt-get install libvulkan1 mesa-vulkan-drivers" in out.stdout
    assert "libvulkan.so.1" in out.stdout


def test_check_names_call_and_result():
    mod = vk.load()

    def lost():
        raise mod.VkErrorDeviceLost()

    with pytest.raises(VulkanError, match="^vkQueueSubmit failed: VK_ERROR_DEVICE_LOST$"):
        vk.check("vkQueueSubmit", lost)
    assert vk.check("vkNothing", lambda x: x + 1, 1) == 2


def test_raw_call_failure_names_call():
    count = vk.new("uint32_t*")
    with pytest.raises(VulkanError, match="vkEnumerateInstanceExtensionProperties failed: "
                                          "VK_ERROR_LAYER_NOT_PRESENT"):
        vk.call("vkEnumerateInstanceExtensionProperties", b"VK_LAYER_does_not_exist", count,
                vk.ffi().NULL)


def test_device_singleton(device):
    from alpha_jit.runtime.device import get_device

    assert get_device() is device
    assert device.caps == select_device() or os.environ.get("ALPHA_JIT_DEVICE")
    assert "timelineSemaphore" in device.features
