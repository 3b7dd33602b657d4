"""Capabilities as data, the device-free step plan, and the profiler's time attribution.

The capabilities record must survive the round trip through `alpha-jit devices --json` exactly
(same fingerprint, so caches and plans agree), the H200's file must plan like the H200, a plan
that cannot fit the device must fail before anything is built, and the profiler's attribution
must add up: per-kernel times sum to the busy time, overlaps are shared, gaps are idle.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit.runtime import caps as caps_mod
from alpha_jit.runtime.caps import CapsFileError, CoopMatShape
from alpha_jit.runtime.profiler import attribute
from alpha_jit.runtime.step_plan import MemoryPlanError, plan_step

H200 = Path(__file__).resolve().parents[1] / "data" / "h200-caps.json"


def _h200():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an older file may predate a defaulted field
        return caps_mod.load(H200)


def test_live_caps_round_trip_through_json(device):
    caps = device.caps
    data = json.loads(json.dumps(caps.to_json()))  # what `devices --json` writes
    back = caps_mod.from_dict(data, "roundtrip")
    assert back == caps and back.fingerprint() == caps.fingerprint()


def test_h200_file_is_typed():
    caps = _h200()
    assert caps.name == "NVIDIA H200" and caps.subgroup_size == 32
    assert all(isinstance(c, CoopMatShape) for c in caps.cooperative_matrix)
    bf16 = caps.coopmat("bf16", "f32")
    assert [(c.m, c.n, c.k) for c in bf16] == [(16, 16, 16)]
    assert isinstance(caps.max_workgroup_count, tuple) and len(caps.max_workgroup_count) == 3
    assert caps.spirv_target_env() == "vulkan1.3"
    # written by `alpha-jit devices --json` on the H200: the record read back is the same one
    assert caps.fingerprint() == json.loads(H200.read_text())[0]["fingerprint"]


def test_list_entries_and_dict_entries_mean_the_same():
    caps = _h200()
    as_dicts = caps_mod.from_dict(caps.to_json())
    assert as_dicts == caps and as_dicts.fingerprint() == caps.fingerprint()


def test_fingerprint_unchanged_by_typed_coopmat_shapes():
    """The disk caches key on the fingerprint: typing the coop-matrix entries must not move it."""
    import hashlib

    caps = _h200()
    fields = dataclasses.asdict(caps)
    fields.pop("index")
    if not caps.fragment_layouts:  # a record without probed layouts keys as before the field
        fields.pop("fragment_layouts")
    else:  # probed layouts hash as plain tuples too
        fields["fragment_layouts"] = tuple(tuple(x.values()) for x in fields["fragment_layouts"])
    fields["cooperative_matrix"] = tuple(tuple(c.values()) for c in fields["cooperative_matrix"])
    old = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]
    assert caps.fingerprint() == old


def test_missing_defaulted_field_warns_and_required_field_errors():
    data = _h200().to_json()
    data.pop("inf_nan_preserve_f32")
    with pytest.warns(UserWarning, match="predates field.*inf_nan_preserve_f32"):
        caps_mod.from_dict(data, "old.json")
    data.pop("max_storage_buffer_range")
    with pytest.raises(CapsFileError, match="old.json: device 'NVIDIA H200' lacks field.*"
                                            "max_storage_buffer_range"):
        caps_mod.from_dict(data, "old.json")


@pytest.mark.parametrize("field, value", [("float16", 1), ("subgroup_size", True),
                                          ("max_workgroup_size", [1024, 1024]),
                                          ("cooperative_matrix", [[16, 16, 16, "f16"]])])
def test_mistyped_field_is_an_error(field, value):
    data = _h200().to_json()
    data[field] = value
    with pytest.raises(CapsFileError, match=f"field '{field}'"):
        caps_mod.from_dict(data, "bad.json")


def _traced_step():
    @aj.compile
    def f(x, w):
        return (x @ w).sum(axis=1)

    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    return f, f.trace(x, w), (x, w)


def test_plan_for_another_device_reads_only_its_caps():
    _, traced, _ = _traced_step()
    plan = plan_step(traced.graph, _h200(), progress=False)
    gemm = next(k for k in plan.kernels if k.family == "matmul")
    assert gemm.variant.startswith("simt") and gemm.flops == 2 * 64 * 32 * 16
    assert plan.peak_bytes == sum(a.bytes for a in plan.allocations)
    assert not plan.problems


def test_a_plan_over_the_allocation_limit_fails_before_building(device):
    f, traced, (x, w) = _traced_step()
    tiny = dataclasses.replace(device.caps, max_memory_allocation_size=4096)
    plan = plan_step(traced.graph, tiny, progress=False)
    assert plan.problems and "maxMemoryAllocationSize=4096" in plan.problems[0]
    with pytest.raises(MemoryPlanError, match="cannot run on"):
        plan.check_fits()
    # through the public API: a temporary bigger than any allocation this device grants
    limit = device.caps.max_memory_allocation_size
    n = limit // 4 + 1024

    @aj.compile
    def huge(v):
        return (v.broadcast_to((n,)) * 2.0).sum()

    pipelines = device.stats["pipelines"]
    with pytest.raises(MemoryPlanError, match="maxMemoryAllocationSize"):
        huge(np.ones(1, np.float32))
    assert device.stats["pipelines"] == pipelines  # refused before the driver compiled anything


def test_attribution_shares_overlaps_and_counts_gaps():
    stamps = [("begin", 0.0),
              ("0.0", 0.0), ("0.0", 100.0),      # kernel 0 alone: 100
              ("1.0", 100.0), ("2.0", 150.0),    # kernels 1 and 2 overlap on [150, 200]
              ("1.0", 200.0), ("2.0", 260.0),
              ("3.0", 300.0), ("3.0", 340.0),    # a 40 ns gap before kernel 3
              ("end", 350.0)]
    att = attribute(stamps)
    assert att.kernel_ns == pytest.approx({0: 100.0, 1: 75.0, 2: 85.0, 3: 40.0})
    assert att.busy_ns == pytest.approx(300.0)
    assert sum(att.kernel_ns.values()) == pytest.approx(att.busy_ns)
    assert att.span_ns == pytest.approx(350.0) and att.idle_ns == pytest.approx(50.0)


def test_attribution_clamps_early_start_stamps():
    # a top-of-pipe stamp written before the step began or after the dispatch ended
    att = attribute([("begin", 10.0), ("0.0", 0.0), ("0.0", 30.0), ("1.0", 50.0),
                     ("1.0", 40.0), ("end", 60.0)])
    assert att.kernel_ns[0] == pytest.approx(20.0) and att.kernel_ns[1] == pytest.approx(0.0)
    assert att.busy_ns == pytest.approx(20.0)


def test_profile_switch_gives_kernel_times(monkeypatch, device):
    monkeypatch.setenv("ALPHA_JIT_PROFILE", "1")
    f, _, (x, w) = _traced_step()
    got = f(x, w)
    want = (x.astype(np.float64) @ w).sum(axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)  # sums cancel
    exe = next(iter(f.cache.values()))[0]
    times = exe.kernel_times()
    assert sorted(i for _, i, _ in times) == list(range(len(exe.lowered.kernels)))
    assert all(ms >= 0 for ms, _, _ in times)


def test_pools_split_the_arena_and_the_step_still_computes_the_same(device):
    """A device with 512 KiB allocations: the temporaries go to several pools, none over the
    limit, no two values live at once share bytes, and the step's results do not change."""
    import alpha_jit.runtime.device as devmod
    from alpha_jit.runtime.plan import plan_memory
    from alpha_jit.runtime.step import Executable

    def step_fn(x, w1, w2):
        h = (x @ w1).relu()
        return ((h @ w2) * h.sum(axis=1, keepdims=True)).mean(axis=0), h.max(axis=1)

    rng = np.random.default_rng(3)
    x, w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in
                 ((512, 64), (64, 256), (256, 256)))
    f = aj.compile(step_fn)
    want = [v.numpy() for v in f(x, w1, w2)]
    limit = 512 * 1024  # the staging region (448 KiB of inputs) must fit too
    small = devmod.Device(dataclasses.replace(device.caps, max_memory_allocation_size=limit))
    try:
        traced = aj.compile(step_fn).trace(x, w1, w2)
        exe = Executable(traced, small)
        mem = exe.plan.memory
        assert len(mem.pool_bytes) > 1 and max(mem.pool_bytes) <= limit
        assert mem.arena_bytes == plan_memory(exe.lowered, 256).arena_bytes  # same peak
        for a in mem.offsets:
            for b in mem.offsets:
                if a < b and mem.pool_of[a] == mem.pool_of[b]:
                    (s1, e1), (s2, e2) = mem.intervals[a], mem.intervals[b]
                    o1, o2 = mem.offsets[a], mem.offsets[b]
                    n1, n2 = (exe.lowered.buffers[i].nbytes for i in (a, b))
                    live_together = not (e1 < s2 or e2 < s1)
                    assert not (live_together and o1 < o2 + n2 and o2 < o1 + n1), (a, b)
        got = [v.numpy() for v in exe([x, w1, w2])]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
        exe.release()
    finally:
        small.close()
