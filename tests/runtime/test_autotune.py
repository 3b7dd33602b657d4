"""GEMM tiling resolution without a GPU: the heuristic, the on-disk tuned choice, the switch
that turns tuning off, and the split-K workspace the plan gets (runtime/autotune.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alpha_jit import dtypes
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels import matmul_coopmat
from alpha_jit.codegen_spirv.kernels.matmul import MatmulConfig, choose_config
from alpha_jit.codegen_spirv.lower import Buffer, LoweredKernel
from alpha_jit.runtime import autotune
from alpha_jit.runtime import caps as caps_mod

H200 = Path(__file__).resolve().parents[1] / "data" / "h200-caps.json"


@pytest.fixture
def h200(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPHA_JIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ALPHA_JIT_AUTOTUNE", raising=False)
    monkeypatch.delenv("ALPHA_JIT_COOPMAT", raising=False)
    return caps_mod.load(H200)


def _wgrad(k=16384):
    """A weight-gradient GEMM of the small GPT: 384 x 384 over K = B*T, b's column sums."""
    return KernelSpec("matmul", "wgrad", (
        ("batch", 1), ("m", 384), ("n", 384), ("k", k), ("a", ("bf16", 0, 0, 1, 384)),
        ("b", ("bf16", 0, 0, 384, 1)), ("out_dtype", "f32"), ("colsum_b", True)))


def _kernel(spec):
    return LoweredKernel(spec, [1, 2], [3, 4], [], None)  # type: ignore[arg-type]


def _buffers():
    return {i: Buffer(i, "temp", (8,), dtypes.float32) for i in (1, 2, 3, 4)}


def test_heuristic_without_a_device_and_the_workspace_it_implies(h200):
    k, bufs = _kernel(_wgrad()), _buffers()
    autotune.resolve([k], h200, None, bufs)
    cfg = MatmulConfig(*dict(k.spec.params)["config"])
    assert cfg == choose_config(_wgrad(), h200) and cfg.variant == "coopmat" and cfg.split > 1
    (ws,) = [b for b in k.writes if b not in (3, 4)]
    assert ws < 0 and k.writes[-1] == ws  # a fresh negative id, bound last
    assert bufs[ws].nbytes == matmul_coopmat.workspace_bytes(dict(k.spec.params), cfg)
    again = _kernel(k.spec)
    autotune.resolve([again], h200, None, _buffers())
    assert again.spec == k.spec and again.writes == [3, 4]  # a config already set is kept


def test_a_cached_tuned_choice_is_used_and_can_be_switched_off(h200, monkeypatch):
    spec = _wgrad()
    tuned = next(c for c in matmul_coopmat.candidates(dict(spec.params), h200)
                 if c != choose_config(spec, h200))
    path = autotune.cache_path(h200)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({autotune.bare_spec(spec).key(): {
        "config": list(tuned.to_param()), "timings_us": {tuned.label(): 1.0}}}))
    k = _kernel(spec)
    autotune.resolve([k], h200, None, _buffers())
    assert MatmulConfig(*dict(k.spec.params)["config"]) == tuned
    monkeypatch.setenv("ALPHA_JIT_AUTOTUNE", "0")
    k = _kernel(spec)
    autotune.resolve([k], h200, None, _buffers())
    assert MatmulConfig(*dict(k.spec.params)["config"]) == choose_config(spec, h200)
    monkeypatch.setenv("ALPHA_JIT_AUTOTUNE", "1")
    monkeypatch.setenv("ALPHA_JIT_COOPMAT", "0")  # a SIMT run never takes a coopmat choice
    k = _kernel(spec)
    autotune.resolve([k], h200, None, _buffers())
    assert MatmulConfig(*dict(k.spec.params)["config"]).variant == "simt"


def test_a_tuned_tile_that_does_not_fit_falls_back(h200):
    # the tuned config of the bare GEMM is not among the spec's own candidates (here: one
    # made up, as column sums' shared memory would rule one out): the heuristic decides
    spec = _wgrad()
    path = autotune.cache_path(h200)
    path.parent.mkdir(parents=True)
    bogus = MatmulConfig("coopmat", 512, 512, 32, 64, 64, 32)
    path.write_text(json.dumps({autotune.bare_spec(spec).key(): {
        "config": list(bogus.to_param()), "timings_us": {}}}))
    k = _kernel(spec)
    autotune.resolve([k], h200, None, _buffers())
    assert MatmulConfig(*dict(k.spec.params)["config"]) == choose_config(spec, h200)


def test_a_corrupt_cache_is_ignored_with_a_warning(h200, caplog):
    path = autotune.cache_path(h200)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    k = _kernel(_wgrad())
    with caplog.at_level("WARNING", logger="alpha_jit.autotune"):
        autotune.resolve([k], h200, None, _buffers())
    assert "ignoring the autotune cache" in caplog.text
    assert "config" in dict(k.spec.params)


def test_cpu_devices_keep_the_rows_variant():
    from alpha_jit.runtime.device import get_device

    try:
        caps = get_device().caps
    except Exception as exc:  # noqa: BLE001 - no Vulkan here
        pytest.skip(str(exc))
    if caps.device_type != "cpu":
        pytest.skip("not a CPU device")
    k = _kernel(_wgrad(k=64))
    autotune.resolve([k], caps, get_device(), _buffers())
    assert MatmulConfig(*dict(k.spec.params)["config"]).variant in ("rows", "simt")


def test_a_gemm_with_an_epilogue_is_tuned_through_the_epilogue_store(h200):
    """The bare spec the tuner times keeps the store path and output dtype of the real kernel:
    a plain f32 output goes straight from the fragments, a residual epilogue through the
    fragment epilogue where the tiles cover the output, a bf16 cast or GELU epilogue through
    the shared scratch as vectors (timed with the f32 direct store, the LM head's tiles
    ranked up to 2x differently)."""
    from alpha_jit.codegen_spirv.kernels.matmul import generate_matmul
    from alpha_jit.ir.ops import registry

    base = (("batch", 1), ("m", 384), ("n", 512), ("k", 64), ("a", ("bf16", 0, 0, 64, 1)),
            ("b", ("bf16", 0, 0, 512, 1)), ("out_dtype", "f32"))
    cast = (("epilogue", ((), (("cast", "bf16", (("dtype", "bf16"),), (("acc",),)),),
                          (("bf16", 0),))), ("acc_dtype", "f32"))
    gelu = (("epilogue", ((), (("gelu", "f32", (), (("acc",),)),
                                ("cast", "bf16", (("dtype", "bf16"),), (("e", 0),))),
                          (("bf16", 1),))), ("acc_dtype", "f32"))
    residual = (("epilogue", ((("f32", (0, 512, 1), 0),),
                              (("add", "f32", (), (("acc",), ("in", 0))),
                               ("cast", "bf16", (("dtype", "bf16"),), (("e", 0),))),
                              (("bf16", 1),))), ("acc_dtype", "f32"))
    # 256-row tiles overhang m = 384: the scratch path (vectors); a GELU epilogue takes it
    # (and its stand-in too) wherever the tiles fall
    for extra, tile, path, kind in (((), 128, "direct store", None),
                                    (residual, 128, "fragment store", "affine"),
                                    (residual, 256, "vector store", "affine"),
                                    (cast, 128, "vector store", "bias"),
                                    (gelu, 128, "vector store", "other")):
        bare = autotune.bare_spec(KernelSpec("matmul", "g", base + extra))
        assert dict(bare.params).get("epilogue_store") == kind
        assert dict(bare.params)["out_dtype"] == ("bf16" if extra else "f32")
        cfg = MatmulConfig("coopmat", tile, 128, 32, 64, 64, 32, 1).to_param()
        b = generate_matmul(KernelSpec("matmul", "g", (*bare.params, ("config", cfg))), h200,
                            registry.scalar_rule)
        real = generate_matmul(KernelSpec("matmul", "g", (*base, *extra, ("config", cfg))),
                               h200, registry.scalar_rule)
        assert b.variant.endswith(path) and real.variant == b.variant, (b.variant, path)


def test_the_callers_overlapping_work_runs_once_whatever_the_tuner_does():
    """`resolve(on_compiling=...)` runs the caller's work exactly once: with nothing to tune,
    without a device, and with GEMMs whose tilings come from the heuristic."""
    from types import SimpleNamespace

    from alpha_jit.codegen_spirv.kernel import KernelSpec
    from alpha_jit.runtime import autotune

    calls = []
    autotune.resolve([], None, on_compiling=lambda: calls.append("none"))
    other = SimpleNamespace(spec=KernelSpec("elementwise", "x", (("shape", (4,)),)))
    autotune.resolve([other], None, on_compiling=lambda: calls.append("other"))
    assert calls == ["none", "other"]
