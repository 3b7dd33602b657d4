"""Kernels executed on the device: run_kernel, push constants, replay, timeline, limits."""

import dataclasses

import numpy as np
import pytest
import rt_shaders as sh

from alpha_jit.codegen_spirv.kernel import Binding, Dispatch
from alpha_jit.errors import AlphaJitError, VulkanError
from alpha_jit.runtime import pipelines as pl
from alpha_jit.runtime.executor import BarrierCmd, CopyCmd, DispatchCmd, TimestampCmd
from alpha_jit.runtime.testing import run_kernel

TOL = {"rtol": 1e-6, "atol": 1e-6}  # GPUs may fuse a + s * b into one FMA (NVIDIA does)


def test_run_kernel_matches_numpy_with_push_constants(device):
    rng = np.random.default_rng(1)
    n = 1000  # not a multiple of the workgroup size (64)
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    (c,) = run_kernel(sh.add_scaled(n, 2.5), [a, b], [((n,), np.float32)])
    np.testing.assert_allclose(c, a + 2.5 * b, **TOL)
    # The push constant n really bounds the write: with n=500 the tail stays at the fill (0).
    (c,) = run_kernel(sh.add_scaled(500, -1.0), [a, b], [((n,), np.float32)])
    np.testing.assert_allclose(c[:500], a[:500] - b[:500], **TOL)
    assert not c[500:].any()


def test_multiple_dispatches_see_each_other(device):
    n = 777
    a = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    (c,) = run_kernel(sh.accumulate(n, [1.0, 2.0, 0.5]), [a], [((n,), np.float32)])
    np.testing.assert_allclose(c, 3.5 * a, **TOL)


def test_run_kernel_binding_count_mismatch(device):
    with pytest.raises(AlphaJitError, match="declares 3 bindings"):
        run_kernel(sh.add_scaled(4, 1.0), [np.zeros(4, np.float32)], [((4,), np.float32)])


def _replay_setup(device, n):
    pipe = device.pipeline(sh.add_scaled(n, 3.0))
    nbytes = 4 * n
    st_a, st_b, st_c = (device.alloc_staging(nbytes) for _ in range(3))
    a, b, c = (device.alloc(nbytes) for _ in range(3))
    cmds = [CopyCmd(st_a, a, nbytes), CopyCmd(st_b, b, nbytes), BarrierCmd(),
            DispatchCmd(pipe, [(a, 0, nbytes), (b, 0, nbytes), c], sh.add_scaled(n, 3.0)
                        .dispatches[0]),
            BarrierCmd(), CopyCmd(c, st_c, nbytes)]
    return cmds, (st_a, st_b, st_c, a, b, c)


def test_recording_replayed_with_new_data(device):
    n = 300
    cmds, (st_a, st_b, st_c, *dev_regions) = _replay_setup(device, n)
    before = device.stats["recordings"]
    rec = device.record(cmds, name="replay")
    rng = np.random.default_rng(3)
    values = []
    for _ in range(5):
        a = rng.standard_normal(n).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        st_a.write(a)
        st_b.write(b)
        v = rec.submit()
        values.append(v)
        device.wait(v)
        out = np.frombuffer(st_c.read(4 * n), np.float32)
        np.testing.assert_allclose(out, a + 3.0 * b, **TOL)
    assert device.stats["recordings"] - before == 1
    assert values == sorted(values) and len(set(values)) == 5
    # Back-to-back submits without a host wait: the second waits for the first internally.
    v1, v2 = rec.submit(), rec.submit()
    assert v2 == v1 + 1
    device.wait(v2, timeout_s=30)
    assert device.completed_value() >= v2
    rec.release()
    for r in (st_a, st_b, st_c, *dev_regions):
        device.free(r)


def test_failed_submit_does_not_advance_timeline(device, monkeypatch):
    n = 64
    cmds, regions = _replay_setup(device, n)
    rec = device.record(cmds)
    device.wait(rec.submit())
    last, last_rec = device.last_submitted, rec.last_value

    def broken(info):
        raise VulkanError("vkQueueSubmit failed: VK_ERROR_DEVICE_LOST")

    monkeypatch.setattr(device, "_queue_submit", broken)
    with pytest.raises(VulkanError, match="vkQueueSubmit failed"):
        rec.submit()
    assert device.last_submitted == last and rec.last_value == last_rec
    monkeypatch.undo()
    assert rec.submit() == last + 1
    device.synchronize()
    rec.release()
    for r in regions:
        device.free(r)


def test_wait_for_unsubmitted_value_raises(device):
    with pytest.raises(AlphaJitError, match="never submitted"):
        device.wait(device.last_submitted + 10)


def test_record_validates_before_recording(device):
    pipe = device.pipeline(sh.add_scaled(8, 1.0))
    r = device.alloc(32)
    before = device.stats["recordings"]
    d = Dispatch((1, 1, 1), sh.pc(8, 1.0))
    with pytest.raises(AlphaJitError, match="2 buffers given.*3 bindings"):
        device.record([DispatchCmd(pipe, [r, r], d)])
    with pytest.raises(AlphaJitError, match="outside a region"):
        device.record([DispatchCmd(pipe, [r, r, (r, 0, 64)], d)])
    with pytest.raises(AlphaJitError, match="push-constant"):
        device.record([DispatchCmd(pipe, [r, r, r], Dispatch((1, 1, 1), b"\0" * 12))])
    with pytest.raises(AlphaJitError, match="outside a region"):
        device.record([CopyCmd(r, r, 64)])
    assert device.stats["recordings"] == before
    device.free(r)


def test_limit_validation_names_kernel_and_limit(device):
    caps = device.caps
    base = sh.add_scaled(8, 1.0, name="too_big")
    created = device.stats["pipelines"]
    cases = [
        (dataclasses.replace(base, bindings=tuple(Binding(f"b{i}", "f32", True) for i in
                                                  range(caps.max_storage_buffers_per_stage + 1))),
         "maxPerStageDescriptorStorageBuffers"),
        (dataclasses.replace(base, push_constant_size=caps.max_push_constants_size + 4),
         "maxPushConstantsSize"),
        (dataclasses.replace(base, shared_bytes=caps.max_shared_memory + 1),
         "maxComputeSharedMemorySize"),
        (dataclasses.replace(base, local_size=(caps.max_workgroup_invocations + 1, 1, 1)),
         "maxComputeWorkGroupInvocations"),
        (dataclasses.replace(base, dispatches=(Dispatch((caps.max_workgroup_count[0] + 1, 1, 1),
                                                        sh.pc(8, 1.0)),)),
         "maxComputeWorkGroupCount"),
    ]
    for binary, limit in cases:
        binary = dataclasses.replace(binary, spec=dataclasses.replace(base.spec,
                                                                      params=(limit,)))
        with pytest.raises(AlphaJitError, match=f"too_big.*{limit}"):
            device.pipeline(binary)
    assert device.stats["pipelines"] == created


def test_pipeline_memo_and_disk_caches(device):
    b = sh.add_scaled(8, 1.0)
    assert device.pipeline(b) is device.pipeline(b)
    device.pipelines.save()
    fp = device.caps.fingerprint()
    path = pl.cache_dir(fp) / "pipeline_cache.bin"
    assert path.exists() and path.stat().st_size > 0
    assert pl.load_cached_spirv("nokey-" + fp) is None
    pl.store_spirv(b.spec.key(), b.words)
    assert pl.load_cached_spirv(b.spec.key()) == b.words
    assert pl.load_cached_spirv(b.spec.key(), fingerprint="other") is None


def test_pipeline_cache_follows_the_probed_fingerprint(device, tmp_path, monkeypatch):
    """The fragment probe changes the caps (and their fingerprint) after the manager exists,
    since it needs pipelines: the cache file then lives in the final fingerprint's folder,
    holding what was compiled before the change and after, and the first folder's file is
    removed (on the H200 it stayed under the pre-probe fingerprint, apart from the kernels
    and tuned configs)."""
    import types

    monkeypatch.setenv("ALPHA_JIT_CACHE_DIR", str(tmp_path))
    proxy = types.SimpleNamespace(handle=device.handle, caps=device.caps, stats=device.stats)
    mgr = pl.PipelineManager(proxy)
    mgr.get(sh.add_scaled(8, 1.0))
    first = mgr.path
    mgr.save()  # a file from an earlier run, read at the start
    assert first.exists()
    proxy.caps = dataclasses.replace(
        device.caps, compute_full_subgroups=not device.caps.compute_full_subgroups)
    assert proxy.caps.fingerprint() != device.caps.fingerprint()
    mgr.follow_caps()
    assert mgr.path == pl.cache_dir(proxy.caps.fingerprint()) / "pipeline_cache.bin"
    assert mgr.get(sh.add_scaled(8, 2.0)).handle
    mgr.destroy()
    assert mgr.path.stat().st_size > 0 and not first.exists()


def test_corrupt_pipeline_cache_is_ignored(device, tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHA_JIT_CACHE_DIR", str(tmp_path))
    p = pl.cache_dir(device.caps.fingerprint()) / "pipeline_cache.bin"
    pl.atomic_write(p, b"garbage" * 10)
    mgr = pl.PipelineManager(device)
    pipe = mgr.get(sh.add_scaled(8, 1.0))
    assert pipe.handle
    mgr.destroy()
    assert p.read_bytes() != b"garbage" * 10


def test_timestamps(device):
    if not device.caps.timestamp_compute:
        pytest.skip("no timestamps on this queue")
    n = 256
    cmds, regions = _replay_setup(device, n)
    rec = device.record([TimestampCmd("start"), *cmds, TimestampCmd("end")])
    rec.submit()
    stamps = rec.timestamps()
    assert [s[0] for s in stamps] == ["start", "end"] and stamps[1][1] >= 0
    rec.release()
    for r in regions:
        device.free(r)


def test_prefetched_pipelines_are_collected_once_and_their_errors_surface(device, tmp_path,
                                                                          monkeypatch):
    """`prefetch` starts driver compiles and returns; `get`/`get_many` collect them (each
    counted once), a failed compile raises where its pipeline is asked for (the others still
    land in the memo), and a prefetched pipeline nobody asked for is destroyed with the
    manager."""
    from alpha_jit.codegen_spirv.kernel import KernelSpec

    monkeypatch.setenv("ALPHA_JIT_CACHE_DIR", str(tmp_path))
    mgr = pl.PipelineManager(device)

    def kernel(name):
        return dataclasses.replace(sh.add_scaled(8, 1.0),
                                   spec=KernelSpec("test", name, ("add_scaled", name)))

    a, b, bad, spare = (kernel(n) for n in ("pf_a", "pf_b", "pf_bad", "pf_spare"))
    real = mgr._create

    def create(binary):
        if binary.spec.name == "pf_bad":
            raise VulkanError("vkCreateComputePipelines: the driver said no")
        return real(binary)

    monkeypatch.setattr(mgr, "_create", create)
    before = device.stats["pipelines"]
    mgr.prefetch([a, b, bad, a])
    assert len(mgr._pending) == 3  # a once
    with pytest.raises(VulkanError, match="the driver said no"):
        mgr.get_many([a, bad, b])
    assert not mgr._pending and set(mgr.pipelines) == {mgr.key(a), mgr.key(b)}
    assert device.stats["pipelines"] == before + 2
    pa, pb = mgr.get(a), mgr.pipelines[mgr.key(b)]
    assert mgr.get_many([b, a]) == [pb, pa] and device.stats["pipelines"] == before + 2
    mgr.prefetch([spare])
    assert mgr.get(spare).handle and device.stats["pipelines"] == before + 3
    mgr.prefetch([kernel("pf_unused")])
    mgr.destroy()
    assert not mgr._pending and not mgr.pipelines and mgr._pool is None
