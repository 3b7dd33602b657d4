"""`alpha-jit profile` and `alpha-jit dump-ir --json/--plan-only/--device-caps` as users run them.

Profile: every kernel of the step appears once, the shares add up to 100%, each row names its
source lines, and the trace file has one event per dispatch. Plan: the `small` GPT planned for
the H200 from its capabilities file on a machine whose own device is made unreachable
(ALPHA_JIT_DEVICE names no device), so the test fails if planning touches a live device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import ROOT, run_cli

H200 = ROOT / "tests" / "data" / "h200-caps.json"


@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory):
    trace = tmp_path_factory.mktemp("profile") / "trace.json"
    out = run_cli("profile", "--json", "--steps", "3", "--warmup", "1", "--trace", str(trace),
                  "examples/train_mlp.py", "--steps", "50")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), json.loads(trace.read_text()), out


def test_profile_lists_every_kernel_once_with_sources(mlp_profile):
    prof, _, _ = mlp_profile
    for key in ("step_ms", "gpu_busy_ms", "host_overhead_ms", "idle_ms", "gpu_span_ms", "rows"):
        assert key in prof
    rows = prof["rows"]
    ids = [r["kernel"] for r in rows]
    assert sorted(ids) == list(range(len(ids))), "each kernel exactly once"
    assert abs(sum(r["percent"] for r in rows) - 100.0) < 0.5
    assert abs(sum(r["gpu_ms"] for r in rows) - prof["gpu_busy_ms"]) < 1e-6 + 1e-3 * prof[
        "gpu_busy_ms"]
    assert prof["gpu_busy_ms"] <= prof["gpu_span_ms"] + 1e-9
    assert prof["step_ms"] > 0 and prof["host_overhead_ms"] > 0
    for r in rows:
        for key in ("kernel", "family", "variant", "calls", "gpu_ms", "percent", "module",
                    "phase", "sources"):
            assert key in r
        assert r["sources"] and all("train_mlp.py:" in s for s in r["sources"]), r
        assert r["phase"] in ("fwd", "bwd", "opt") or "+" in r["phase"]
        assert r["calls"] >= 1
    families = {r["family"] for r in rows}
    assert {"matmul", "elementwise", "reduction"} <= families
    gemm = next(r for r in rows if r["family"] == "matmul")
    assert gemm["flops"] > 0 and gemm["bytes"] > 0
    assert {r["phase"] for r in rows} >= {"fwd", "bwd", "opt"}


def test_profile_trace_has_one_event_per_dispatch(mlp_profile):
    prof, trace, _ = mlp_profile
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == sum(r["calls"] for r in prof["rows"])
    assert all("train_mlp.py:" in e["name"] and e["dur"] >= 0 for e in events)


def test_profile_table_for_people():
    out = run_cli("profile", "--steps", "2", "--warmup", "0", "--top", "5",
                  "examples/train_mlp.py", "--steps", "20")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for word in ("GPU busy", "host overhead", "idle between dispatches", "TFLOP/s", "sources",
                 "more kernels"):
        assert word in text, word


def test_profile_of_a_script_without_a_compiled_step(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("print('no step here')\n")
    out = run_cli("profile", str(script))
    assert out.returncode == 1
    assert "finished without calling a compiled step" in out.stderr


def test_plan_small_gpt_for_the_h200_offline():
    out = run_cli("dump-ir", "--json", "--plan-only", "--device-caps", str(H200),
                  "examples/train_gpt.py", "--config", "small", "--precision", "bf16",
                  env={"ALPHA_JIT_DEVICE": "no-such-device", "ALPHA_JIT_AUTOTUNE": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)  # the script's own prints went to stderr
    assert plan["device"] == "NVIDIA H200" and plan["plan_only"] is True
    assert plan["spirv_validated"] > 0
    names = [s["name"] for s in plan["stages"]]
    assert names[0] == "after trace (forward)" and names[1].startswith("pass gemm_merge")
    assert names[2:4] == ["after autodiff", "traced step (fwd + bwd + opt)"]
    assert "pass cse" in names and "pass cast_fold" in names and names[-1] == "schedule"
    assert all(isinstance(s["nodes"], int) and s["nodes"] > 0 for s in plan["stages"])
    kernels = plan["kernels"]
    # the fusion compiler's target for this step (issue 8): at most 160 kernels, besides the
    # bias gradients, which a GPU sums as column strips of their own (one per Linear: 4 per
    # layer): inside the weight-gradient GEMMs they cost the H200 more (schedule/colsum.py).
    # The position embedding's gradient (a sum over the batch) is one more strip sum.
    strips = [k for k in kernels if k["family"] == "reduction"
              and k["variant"].startswith("column strips")]
    assert len(strips) == 6 * 4 + 1 and all(k["phase"] == "bwd" for k in strips)
    assert len(kernels) == plan["stages"][-1]["kernels"]
    assert 100 < len(kernels) - (len(strips) - 1) <= 160
    # a split-K GEMM, a row-chunked norm weight gradient and the segment-sum scatter (issue
    # 9) add a pass each: every dispatch past a kernel's first is one of those
    extra = sum(len(k["grid"]) - 1 for k in kernels)
    assert extra == sum(("split-k" in k["variant"] or "row chunks" in k["variant"]
                         or "segment" in k["variant"]) for k in kernels)
    assert plan["stages"][-1]["dispatches"] == len(kernels) + extra
    for k in kernels:
        assert set(k) >= {"id", "family", "variant", "grid", "bytes", "flops", "module",
                          "phase", "sources"}
        assert all(len(g) == 3 for g in k["grid"]) and k["bytes"] > 0
    gemms = [k for k in kernels if k["family"] == "matmul"]
    # planned for the H200's caps, not lavapipe's (its CPU "rows" variant): the bf16 GEMMs on
    # cooperative matrices, the f32 ones (none in a bf16 step but odd ones) on SIMT tiles
    assert gemms and all(k["variant"].split()[0] in ("coopmat", "simt") for k in gemms)
    coop = sum(k["flops"] for k in gemms if k["variant"].startswith("coopmat"))
    assert coop >= 0.9 * sum(k["flops"] for k in gemms)
    assert any(k["module"].startswith("blocks.") for k in gemms)
    mem = plan["memory"]
    assert mem["peak_bytes"] == sum(mem["allocations"]) > 0
    assert mem["max_allocation_bytes"] > 4 * 10**9  # the H200's, not this machine's
    assert mem["fits"] is True and mem["problems"] == []


def test_gpt2_plan_fits_the_h200_within_torch_compiles_peak():
    out = run_cli("dump-ir", "--json", "--plan-only", "--device-caps", str(H200),
                  "examples/train_gpt.py", "--config", "gpt2", "--precision", "bf16",
                  env={"ALPHA_JIT_DEVICE": "no-such-device", "ALPHA_JIT_AUTOTUNE": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    mem = json.loads(out.stdout)["memory"]
    # batch 8 x 1024 tokens: torch.compile's measured peak on the H200 is 5.16 GiB
    assert mem["fits"] and mem["peak_bytes"] <= 5.1 * 2**30
    assert max(mem["allocations"]) <= mem["max_allocation_bytes"]


def test_plan_names_what_does_not_fit(tmp_path):
    caps = json.loads(H200.read_text())
    caps[0]["max_memory_allocation_size"] = 4096  # a device with 4 KiB allocations
    small = tmp_path / "tiny-device.json"
    small.write_text(json.dumps(caps))
    out = run_cli("dump-ir", "--device-caps", str(small), "examples/train_mlp.py",
                  env={"ALPHA_JIT_DEVICE": "no-such-device", "ALPHA_JIT_AUTOTUNE": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    # temporaries spread over pools; one larger than any allocation is named with its shape
    assert "DOES NOT FIT: arena pool" in text and "maxMemoryAllocationSize=4096" in text
    assert "the largest temporary is %" in text and "f32[" in text


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("subgroup_size"), "lacks field(s) subgroup_size"),
    (lambda d: d.update(max_shared_memory="48K"), "field 'max_shared_memory': expected an "
                                                  "integer"),
])
def test_bad_caps_file_is_a_clear_error(tmp_path, edit, message):
    caps = json.loads(H200.read_text())
    edit(caps[0])
    bad = tmp_path / "caps.json"
    bad.write_text(json.dumps(caps))
    out = run_cli("dump-ir", "--plan-only", "--device-caps", str(bad), "examples/train_mlp.py")
    assert out.returncode == 2
    assert "alpha-jit dump-ir: error:" in out.stderr and message in out.stderr
    assert str(bad) in out.stderr and "NVIDIA H200" in out.stderr
    assert "train_mlp" not in out.stderr  # refused before the script ran


def test_caps_file_that_is_not_json(tmp_path):
    bad = tmp_path / "caps.json"
    bad.write_text("{not json")
    out = run_cli("dump-ir", "--device-caps", str(bad), "examples/train_mlp.py")
    assert out.returncode == 2 and "not JSON" in out.stderr
    out = run_cli("dump-ir", "--device-caps", str(Path(tmp_path) / "none.json"),
                  "examples/train_mlp.py")
    assert out.returncode == 2 and "cannot read" in out.stderr
