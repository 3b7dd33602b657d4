"""`alpha-jit bench` on the tiny config: the shape of its output, the checks it makes, never the
speeds (no timing assert holds on a shared CPU).

One bench run (GEMM + step, bf16, tiny) feeds most tests through its JSON file; the parity
guard's INVALID path, the GEMM check's teeth, the sweep and the torch-less path use the bench's
functions directly on a micro model, so the file stays well under a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest

from alpha_jit import cli
from alpha_jit import nn as ajnn
from benchmarks import configs, gemm, gpt_step, peaks, report
from benchmarks.configs import BenchConfig
from benchmarks.environment import import_torch, probe

torch = import_torch()
TORCH_CUDA = torch is not None and torch.cuda.is_available()
MICRO = BenchConfig("micro", ajnn.GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2,
                                            n_embd=32), batch=2)
FAST = gpt_step.StepOptions(steps=2, warmup=1, parity_steps=4, host_samples=2,
                            compile_time=False, torch_compile=False)

_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One `alpha-jit bench` run on the tiny config: (exit status, stdout, JSON rows, out dir)."""
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(["bench", "--configs", "tiny", "--precision", "bf16",
                           "--gemm-square", "64", "--steps", "3", "--warmup", "1",
                           "--no-compile-time", "--json", str(out / "rows.jsonl"),
                           "--out", str(out / "dir")])
    lines = (out / "rows.jsonl").read_text().splitlines()
    return status, stdout.getvalue(), [json.loads(ln) for ln in lines], out


def _rows(rows, kind):
    return [r for r in rows if r["kind"] == kind]


def _check_types(row: dict, cls: type) -> None:
    """Every key documented, every documented key present, each value of its field's type."""
    keys = report.GEMM_KEYS if cls is report.GemmRow else report.STEP_KEYS
    assert set(row) == set(keys), set(row) ^ set(keys)
    for f in dataclasses.fields(cls):
        v = row[f.name]
        t = str(f.type)
        if v is None:
            assert "None" in t, f"{f.name} is null but typed {t}"
            assert f.name in row["why_empty"] or not row["valid"] or f.name in (
                "error", "torch_version", "torch_device", "device"), \
                f"{f.name} is empty without a reason"
            continue
        base = t.split("|")[0].strip()
        if base.startswith(("dict", "tuple")):
            assert isinstance(v, dict if base.startswith("dict") else list), (f.name, v)
        else:
            assert isinstance(v, _TYPES[eval(base)]), (f.name, v, t)  # noqa: S307


def test_bench_runs_and_writes_json_and_tables(bench):
    status, stdout, rows, out = bench
    assert status == 0
    assert rows[0]["kind"] == "run" and set(rows[0]) == set(report.RUN_KEYS)
    assert rows[0]["device"] and rows[0]["options"]["configs"] == "tiny"
    assert "GEMM: alpha_jit kernel vs torch.matmul" in stdout
    assert "GPT training step" in stdout
    assert (out / "dir" / "bench.jsonl").read_text().splitlines() == \
        (out / "rows.jsonl").read_text().splitlines()
    assert "GPT training step" in (out / "dir" / "bench.txt").read_text()


def test_gemm_rows_are_correct_against_numpy(bench):
    _, _, rows, _ = bench
    gemms = _rows(rows, "gemm")
    uses = {u for r in gemms for u in r["uses"]}
    assert "square 64^3" in uses and any(u.startswith("tiny@4 bf16") for u in uses)
    # every GEMM of the traced tiny step is there: the head (n = vocab 256), the MLP
    # (attention's batched GEMMs are inside the fused attention kernels now)
    assert any(r["n"] == 256 for r in gemms)
    for r in gemms:
        _check_types(r, report.GemmRow)
        assert r["valid"] and r["status"] == "ok", r
        assert r["check_rel_err"] is not None and r["check_rel_err"] <= r["check_tol"]
        assert r["alpha_ms"] > 0 and r["alpha_tflops"] > 0
        assert r["flops"] == 2 * r["batch"] * r["m"] * r["n"] * r["k"]
        if not TORCH_CUDA:
            assert r["torch_ms"] is None and r["ratio"] is None
            assert r["why_empty"]["torch_ms"] and r["why_empty"]["ratio"]


def test_step_rows_valid_and_guarded(bench):
    _, stdout, rows, _ = bench
    steps = _rows(rows, "step")
    by_side = {r["side"]: r for r in steps}
    alpha = by_side["alpha_jit"]
    for r in steps:
        _check_types(r, report.StepRow)
    assert alpha["valid"] and alpha["config"] == "tiny" and alpha["precision"] == "bf16"
    assert alpha["ms_per_step"] > 0 and alpha["tokens_per_s"] > 0
    assert alpha["mem_planned_bytes"] > 0
    assert alpha["mem_allocated_bytes"] >= alpha["mem_planned_bytes"]
    assert alpha["params"] == 437760 and alpha["tokens_per_step"] == 256
    assert alpha["host_overhead_ms"] > 0 and alpha["first_call_s"] > 0
    assert alpha["compile_cold_s"] is None and "--no-compile-time" in \
        alpha["why_empty"]["compile_cold_s"]
    if torch is None:
        assert alpha["status"] == "unchecked" and not alpha["parity_checked"]
        assert set(by_side) == {"alpha_jit"}
        return
    # the guard really compared: 10 losses of each side, from the same weights and batch
    assert alpha["status"] == "ok" and alpha["parity_checked"]
    assert alpha["parity_steps"] == 10 and alpha["parity_max_rel"] <= 1e-2
    eager = by_side["torch_eager"]
    assert math.isclose(eager["loss_first"], alpha["loss_first"], rel_tol=1e-2)
    assert eager["loss_last"] < eager["loss_first"]  # it trained: the same batch, 10 steps
    if not TORCH_CUDA:  # torch ran the guard on the CPU: its timing columns say why empty
        assert alpha["parity_reference"] == "torch_eager on cpu"
        for col in ("ms_per_step", "tokens_per_s", "mem_peak_bytes", "host_overhead_ms"):
            assert eager[col] is None and "CUDA" in eager["why_empty"][col], col
        assert alpha["vs_torch_eager"] is None and "CUDA" in alpha["why_empty"]["vs_torch_eager"]
        assert "torch_compile" not in by_side
        assert "torch columns are empty: no CUDA device" in stdout


def test_parity_guard_verdicts():
    g = gpt_step.parity_guard
    ok = g([5.0, 4.0], [5.01, 4.02], 1e-2, "ref")
    assert ok.checked and ok.ok and ok.max_rel == pytest.approx(0.02 / 4.02)
    bad = g([5.0, 4.5], [5.0, 4.0], 1e-2, "ref")
    assert bad.checked and not bad.ok and "4.5" in bad.why and "4" in bad.why
    nan = g([5.0, float("nan")], [5.0, 4.0], 1e-2, "ref")
    assert not nan.ok and "not finite" in nan.why
    assert not g([], [], 1e-2, "ref").checked


def test_bf16_drift_is_judged_against_pytorch_in_f32():
    """bf16 trajectories drift (H200, gpt2 B8: eager and torch.compile ended up to 1.1% apart).
    A row missing the tolerance against eager is valid only when it agrees with PyTorch's f32
    run (to the tolerance, or as well as eager bf16 does); torch.compile keeps its row."""
    S = gpt_step.SideRun
    eager = S(gpt_step.EAGER, losses=(10.98, 9.12), device="cuda")
    comp = S(gpt_step.COMPILE, losses=(10.98, 9.024), device="cuda")
    f32 = S(gpt_step.EAGER, losses=(10.98, 9.03), device="cuda")
    runs = {gpt_step.EAGER: eager, gpt_step.COMPILE: comp,
            gpt_step.ALPHA: S(gpt_step.ALPHA, losses=(10.98, 9.018))}
    v = gpt_step._verdicts(runs, gpt_step.parity_guard, 1e-2, None, f32)
    assert v[gpt_step.ALPHA].ok and "alpha_jit is closer to it than" in v[gpt_step.ALPHA].why
    assert v[gpt_step.COMPILE].ok and "drift apart" in v[gpt_step.COMPILE].why
    # without the f32 arbiter, or farther from it than eager: INVALID
    assert not gpt_step._verdicts(runs, gpt_step.parity_guard, 1e-2, None)[gpt_step.ALPHA].ok
    runs[gpt_step.ALPHA] = S(gpt_step.ALPHA, losses=(10.98, 8.5))
    assert not gpt_step._verdicts(runs, gpt_step.parity_guard, 1e-2, None, f32)[
        gpt_step.ALPHA].ok
    far = S(gpt_step.EAGER, losses=(10.98, 9.2), device="cuda")
    runs[gpt_step.ALPHA] = S(gpt_step.ALPHA, losses=(10.98, 9.018))
    assert not gpt_step._verdicts(runs, gpt_step.parity_guard, 1e-2, None, far)[
        gpt_step.ALPHA].ok


@pytest.mark.skipif(torch is None, reason="the parity guard needs PyTorch as the reference")
def test_mismatched_loss_is_reported_invalid_never_as_a_speed():
    def skewed(losses, reference, tol, name):  # alpha_jit's losses, 5 % off
        return gpt_step.parity_guard([v * 1.05 for v in losses], reference, tol, name)

    env = probe()
    rows = gpt_step.bench_config(MICRO, "f32", env, FAST, guard=skewed)
    alpha = next(r for r in rows if r.side == "alpha_jit")
    assert not alpha.valid and alpha.status == "INVALID"
    assert "parity guard failed" in alpha.error and "relative" in alpha.error
    for col in ("ms_per_step", "tokens_per_s", "host_overhead_ms", "vs_torch_eager",
                "first_call_s"):
        assert getattr(alpha, col) is None and "parity guard failed" in alpha.why_empty[col]
    assert alpha.parity_checked and alpha.parity_max_rel > 1e-2
    text = report.step_table(rows)
    assert "INVALID [1]" in text and "parity guard failed" in text
    # and the honest guard passes the same step
    rows = gpt_step.bench_config(MICRO, "f32", env, FAST)
    alpha = next(r for r in rows if r.side == "alpha_jit")
    assert alpha.valid and alpha.parity_max_rel < 1e-4, alpha.error


def test_without_torch_alpha_runs_alone_and_says_why():
    env = probe(want_torch=False)
    assert env.torch_version is None and "not requested" in env.why_no_torch
    rows = gpt_step.bench_config(MICRO, "bf16", env, FAST)
    assert [r.side for r in rows] == ["alpha_jit"]
    alpha = rows[0]
    assert alpha.valid and alpha.status == "unchecked" and alpha.ms_per_step > 0
    assert "not requested" in alpha.why_empty["vs_torch_eager"]
    assert "not requested" in alpha.why_empty["parity_max_rel"]


def test_sweep_grows_the_batch_until_the_limit():
    from benchmarks.sweep import batch_sizes, sweep_batch

    assert batch_sizes(5) == [1, 2, 4]
    env = probe(want_torch=False)
    rows = list(sweep_batch([MICRO], ["f32"], env, FAST, max_batch=2))
    assert [(r.kind, r.side, r.batch) for r in rows] == [("sweep", "alpha_jit", 1),
                                                          ("sweep", "alpha_jit", 2)]
    assert all(r.valid and r.tokens_per_s > 0 and r.mem_allocated_bytes for r in rows)


def test_a_step_that_cannot_run_is_a_row_and_the_bench_goes_on():
    env = probe(want_torch=False)
    # a vocabulary whose logits (B*T x V f32) exceed any device's storage-buffer range
    huge = BenchConfig("huge", ajnn.GPTConfig(vocab_size=2**20, block_size=64, n_layer=1,
                                              n_head=1, n_embd=8), batch=64)
    rows = gpt_step.bench_config(huge, "f32", env, FAST)
    assert rows[0].status == "does not run" and not rows[0].valid
    assert rows[0].error and rows[0].ms_per_step is None
    assert "does not run [1]" in report.step_table(rows)


def test_gemm_check_has_teeth():
    # a strided case: transposed A at an offset, B broadcast over the batch
    case = gemm.GemmCase(3, 40, 24, 56, gemm.Operand("f32", 8, 56 * 40, 1, 40),
                         gemm.Operand("f32", 0, 0, 24, 1), "f32", ("test",))
    timing, rel, got = gemm.alpha_gemm(case, seed=5, target_ms=1.0, trials=1)
    assert timing.ms > 0 and rel <= gemm.tolerance(case)
    _, va = gemm.operand_data("f32", case.a.elements(3, 40, 56), 5)
    _, vb = gemm.operand_data("f32", case.b.elements(3, 56, 24), 5 + 7919)
    assert gemm.rel_error(case, got, va, vb) == rel
    assert gemm.rel_error(case, got, va, vb, chunk=64) == pytest.approx(rel, abs=1e-12)
    wrong = got.copy()
    wrong[2, 39, 23] += 0.5  # one element of the last tile
    assert gemm.rel_error(case, wrong, va, vb) > gemm.tolerance(case)
    wrong[0, 0, 0] = np.nan
    assert gemm.rel_error(case, wrong, va, vb) == math.inf
    assert case.layout == "TNb0"


def test_configs_and_flops():
    for kw in ({}, dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, bias=False)):
        cfg = ajnn.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw)
        assert configs.count_params(cfg) == ajnn.GPT(cfg).num_params()
    gpt2 = configs.resolve("gpt2")
    assert gpt2.batch == 8 and configs.resolve("gpt2@1").batch == 1
    assert configs.resolve("small", batch=3).batch == 3
    n = configs.count_params(gpt2.model) - 1024 * 768  # nanoGPT's 124M, minus wpe
    assert configs.step_flops(gpt2.model, 1) == 6 * n * 1024 + 12 * 12 * 12 * 64 * 1024 ** 2
    with pytest.raises(ValueError, match="known configs"):
        configs.resolve("nope")


def test_peaks_table():
    assert peaks.peak_tflops("NVIDIA H200", "bf16") == (989.4, None)
    assert peaks.peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert peaks.peak_tflops("NVIDIA H100 80GB HBM3", "f32")[0] == 66.9
    value, why = peaks.mfu(1e12, 1.0, "llvmpipe (LLVM 15.0.6, 256 bits)", "bf16")
    assert value is None and "llvmpipe" in why


@pytest.mark.parametrize("argv, message", [
    (["--configs", "nope"], "known configs"),
    (["--precision", "f16"], "use --only gemm for f16"),
    (["--precision", "f64"], "choose from"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch is None, reason="the PyTorch twin needs torch")
def test_torch_twin_names_and_attention_spellings():
    from benchmarks.torch_gpt import TorchGPT, from_alpha

    cfg = ajnn.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32,
                         norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, bias=False)
    model = ajnn.GPT(cfg)
    math_model = from_alpha(model, attention="math")
    sdpa = from_alpha(model, attention="sdpa")
    assert [n for n, _ in math_model.named_parameters()] == \
        [n for n, _ in model.named_parameters()]
    x = torch.randint(0, 64, (2, 12))
    assert torch.allclose(math_model(x, x), sdpa(x, x), rtol=1e-5)
    arrays = {n: p.numpy() for n, p in model.named_parameters()}
    arrays.pop("ln_f.weight")
    with pytest.raises(ValueError, match="ln_f.weight"):
        TorchGPT(cfg).load_arrays(arrays)


def test_compile_probe_runs_cold_then_warm_from_the_disk_cache():
    from benchmarks import compile_probe

    cold, warm, note = compile_probe.measure(configs.resolve("tiny"), "bf16", seed=0)
    # two fresh processes: the second found every kernel on disk (note would say otherwise)
    # and computed the same first loss
    assert cold is not None and warm is not None and cold > 0 and warm > 0, note
    assert note is None
    # each probe says where its build went (the warm one's phases are a bench footnote)
    for phase in ("trace", "passes", "plan", "pipelines", "memory", "record"):
        assert phase in compile_probe.last_builds["warm"]
    assert float(compile_probe.last_builds["warm"].split()[0]) < warm


def test_a_wrong_gemm_output_is_invalid_never_a_speed():
    def off_by_a_bit(case, got, va, vb):  # the kernel's output, 0.1 % too large
        return gemm.rel_error(case, got * 1.001, va, vb)

    env = probe(want_torch=False)
    [row] = gemm.bench([gemm.square(32, "f32")], env, target_ms=1.0, trials=1,
                       check=off_by_a_bit)
    assert not row.valid and row.status == "INVALID" and "wrong" in row.error
    assert row.alpha_ms is None and row.alpha_tflops is None and row.ratio is None
    assert row.check_rel_err > row.check_tol and "wrong" in row.why_empty["alpha_ms"]
    assert "INVALID [1]" in report.gemm_table([row])


def test_gemm_case_keeps_the_steps_operand_rounding():
    """A step GEMM that rounds an f32 operand on load is benchmarked as that kernel (the spec's
    round flag kept) and checked against the rounded operand; torch gets a bf16 operand."""
    from benchmarks.gemm import GemmCase, alpha_gemm

    params = (("batch", 1), ("m", 33), ("n", 20), ("k", 70), ("a", ("f32", 0, 0, 70, 1)),
              ("b", ("bf16", 0, 0, 20, 1)), ("out_dtype", "f32"), ("a_round", "bf16"))
    case = GemmCase.from_params(params, "test")
    assert case.params == params and case.spec().params == params
    _, rel, _ = alpha_gemm(case, seed=3, target_ms=0.1, trials=1)
    assert rel < 1e-5  # against float64 of the bf16-rounded A: it would be ~1e-3 unrounded
