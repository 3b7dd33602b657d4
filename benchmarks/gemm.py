"""GEMM bench: alpha_jit's matmul kernel against torch.matmul (cuBLAS), one shape at a time.

Why: GEMMs are most of a transformer step's FLOPs, so the matmul kernel's speed bounds the
step's. Shapes are the square 4096^3 (the field's usual yardstick) and every distinct GEMM of
the GPT steps, taken from the traced step itself (`compiled.trace` + `lower`): batch, M, N, K
and each operand's dtype, offset and batch/row/column strides, exactly as the step runs them
(transposed weights, strided attention heads, broadcast batches). Each precision's step is
traced at that precision (bf16/f16 steps give 16-bit operands with f32 outputs).

alpha_jit side: the kernel `generate(spec, caps)` makes for exactly that spec, its pipeline,
operands in device buffers, and one recording per trial: the output filled with NaN, a start
timestamp, the kernel's dispatches `reps` times (a barrier between repeats and between split
dispatches, as a step records them), an end timestamp. Time = GPU timestamps / reps, median
over trials. The output after the last trial is compared with a float64 numpy GEMM of the same
operand values (random normal numbers, never zeros): relative L2 error must stay within f32
accumulation over K (max(1e-5, 4 sqrt(K) 2^-24)) plus two units of roundoff of the output type.
A wrong or non-finite result makes the row INVALID and its time is not reported.

torch side: random operands of the same layout (`as_strided` views of flat buffers), the same
output type where torch can write it (`mm`/`bmm` with `out_dtype`), timed with CUDA events in
the same process, median over trials. Without CUDA the torch columns stay empty, with the reason.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from benchmarks.configs import BenchConfig
from benchmarks.environment import Environment, log, median, short_error
from benchmarks.report import GemmRow

DTYPES = ("bf16", "f16", "f32")
_NP_STORAGE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
_NAN_FILL = {"f32": 0x7FC00000, "f16": 0x7E007E00, "bf16": 0x7FC07FC0}  # quiet NaN patterns
_UNIT_ROUNDOFF = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8}  # f32: accumulation only
_POOL = 1_000_003  # random values are a prime-length pool tiled over the operand
_CHUNK = 1 << 24  # elements per float64 block of the numpy reference
MAX_REPS = 1000


@dataclass(frozen=True)
class Operand:
    """One GEMM operand as the matmul spec gives it: A is (batch, m, k), B is (batch, k, n);
    element [i, r, c] is at offset + i*sb + r*s0 + c*s1 (strides in elements)."""

    dtype: str
    offset: int
    sb: int
    s0: int
    s1: int

    def elements(self, batch: int, rows: int, cols: int) -> int:
        """Length of the flat buffer the strides reach into."""
        if min(self.offset, self.sb, self.s0, self.s1) < 0:
            raise ValueError(f"operand {self} has a negative offset or stride")
        return self.offset + (batch - 1) * self.sb + (rows - 1) * self.s0 + \
            (cols - 1) * self.s1 + 1

    def layout(self, batch: int) -> str:
        kind = "N" if self.s1 == 1 else "T" if self.s0 == 1 else "S"  # row-/column-major/strided
        return kind + ("b0" if batch > 1 and self.sb == 0 else "")  # b0: batch-broadcast


@dataclass(frozen=True)
class GemmCase:
    """A GEMM to measure: the matmul kernel spec's parameters and where the shape is used."""

    batch: int
    m: int
    n: int
    k: int
    a: Operand
    b: Operand
    out_dtype: str
    uses: tuple[str, ...]
    # an f32 operand the step's kernel rounds on load (its graph cast it): "bf16", or None
    a_round: str | None = None
    b_round: str | None = None

    @property
    def params(self) -> tuple:
        """The matmul KernelSpec params (the kernel family's contract, see kernels/matmul.py)."""
        a, b = self.a, self.b
        return (("batch", self.batch), ("m", self.m), ("n", self.n), ("k", self.k),
                ("a", (a.dtype, a.offset, a.sb, a.s0, a.s1)),
                ("b", (b.dtype, b.offset, b.sb, b.s0, b.s1)), ("out_dtype", self.out_dtype)) \
            + tuple((f"{x}_round", r) for x, r in (("a", self.a_round), ("b", self.b_round))
                    if r)

    def spec(self) -> Any:
        from alpha_jit.codegen_spirv.kernel import KernelSpec

        return KernelSpec("matmul", f"bench_matmul_{self.batch}x{self.m}x{self.n}x{self.k}",
                          self.params)

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.n * self.k

    @property
    def layout(self) -> str:
        return f"{self.a.layout(self.batch)}{self.b.layout(self.batch)}"

    @staticmethod
    def from_params(params: tuple, use: str) -> GemmCase:
        p = dict(params)
        return GemmCase(p["batch"], p["m"], p["n"], p["k"], Operand(*p["a"]), Operand(*p["b"]),
                        p["out_dtype"], (use,), p.get("a_round"), p.get("b_round"))


def square(n: int, dtype: str) -> GemmCase:
    """Row-major n x n times n x n, the output in the input type (the textbook GEMM)."""
    op = Operand(dtype, 0, 0, n, 1)
    return GemmCase(1, n, n, n, op, op, dtype, (f"square {n}^3",))


def traced(bc: BenchConfig, precision: str, max_bindings: int = 64, model: Any = None) -> \
        list[GemmCase]:
    """Every distinct matmul of `bc`'s training step at `precision`, from the traced graph
    (no device work); `uses` says which step and how many times it runs per step."""
    from alpha_jit.codegen_spirv.lower import lower
    from benchmarks import training

    model = model if model is not None else training.alpha_model(bc, seed=0)
    step = training.alpha_step(model, precision)
    x = np.zeros((bc.batch, bc.seq), np.int32)
    lowered = lower(step.trace(x, x).graph, max_bindings)
    counts: dict[tuple, int] = {}
    for kern in lowered.kernels:
        if kern.spec.family == "matmul":
            counts[kern.spec.params] = counts.get(kern.spec.params, 0) + 1
    return [GemmCase.from_params(p, f"{bc.label} {precision} x{c}") for p, c in counts.items()]


def collect(configs: Sequence[BenchConfig], dtypes: Sequence[str], square_n: int,
            max_bindings: int = 64) -> list[GemmCase]:
    """The square GEMM and every step GEMM per dtype, duplicates merged (their uses joined)."""
    from benchmarks import training

    cases: dict[tuple, GemmCase] = {}

    def add(c: GemmCase) -> None:
        old = cases.get(c.params)
        cases[c.params] = c if old is None else replace(old, uses=old.uses + c.uses)

    models = {}
    for dt in dtypes:
        if square_n:
            add(square(square_n, dt))
        for bc in configs:
            log(f"gemm: tracing the {bc.label} {dt} step for its GEMM shapes")
            if bc.name not in models:  # one model per config: tracing leaves its weights alone
                models[bc.name] = training.alpha_model(bc, seed=0)
            for c in traced(bc, dt, max_bindings, models[bc.name]):
                add(c)
    return list(cases.values())


# ---- operands and the reference -----------------------------------------------------------------
@functools.lru_cache(maxsize=len(DTYPES))
def _pool(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(storage, exact float32 values) of _POOL random normal numbers in `dtype`."""
    from alpha_jit import dtypes

    x = np.random.default_rng(1234).standard_normal(_POOL, dtype=np.float32)
    if dtype == "bf16":
        bits = dtypes.f32_to_bf16(x)
        return bits, dtypes.bf16_to_f32(bits)
    if dtype == "f16":
        h = x.astype(np.float16)
        return h, h.astype(np.float32)
    return x, x


def operand_data(dtype: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` elements (storage for the device, float32 values for the reference); `seed`
    shifts the pool so two operands never hold the same sequence."""
    storage, values = _pool(dtype)
    shift = seed % _POOL
    return (np.resize(np.roll(storage, -shift), count),
            np.resize(np.roll(values, -shift), count))


def tolerance(case: GemmCase) -> float:
    """f32 accumulation over K (10x the expected random-walk error) + two output roundoffs.
    16-bit operands run on tensor cores, which add each fragment step's products with
    truncated alignment rather than IEEE rounding: 4x that allowance (DESIGN.md allows 1e-2)."""
    low = {case.a.dtype, case.b.dtype, case.a_round, case.b_round} & {"bf16", "f16"}
    walk = (16.0 if low else 4.0) * math.sqrt(case.k) * 2.0 ** -24
    return max(1e-5, walk) + 2 * _UNIT_ROUNDOFF[case.out_dtype]


def _view(values: np.ndarray, op: Operand, shape: tuple[int, int, int]) -> np.ndarray:
    isz = values.itemsize
    return np.lib.stride_tricks.as_strided(values[op.offset:], shape,
                                           (op.sb * isz, op.s0 * isz, op.s1 * isz),
                                           writeable=False)


def rel_error(case: GemmCase, got: np.ndarray, va: np.ndarray, vb: np.ndarray,
              chunk: int = _CHUNK) -> float:
    """Relative L2 error of `got` (batch, m, n) against A @ B in float64 (computed `chunk`
    elements at a time); inf if `got` holds NaN or inf."""
    if not np.isfinite(got).all():
        return math.inf
    bt, m, n, k = case.batch, case.m, case.n, case.k
    a, b = _view(va, case.a, (bt, m, k)), _view(vb, case.b, (bt, k, n))
    num = den = 0.0

    def acc(g: np.ndarray, ref: np.ndarray) -> None:
        nonlocal num, den
        d = (g.astype(np.float64) - ref).ravel()
        num += float(d @ d)
        den += float(ref.ravel() @ ref.ravel())

    per = m * k + k * n + m * n
    if per <= chunk:
        step = max(1, chunk // per)
        for b0 in range(0, bt, step):
            s = slice(b0, b0 + step)
            acc(got[s], np.matmul(a[s].astype(np.float64), b[s].astype(np.float64)))
    else:
        rows = max(1, chunk // (k + n))
        for i in range(bt):
            b64 = b[i].astype(np.float64)
            for r0 in range(0, m, rows):
                acc(got[i, r0:r0 + rows], a[i, r0:r0 + rows].astype(np.float64) @ b64)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


# ---- alpha_jit ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    ms: float  # median per-GEMM time over the trials
    reps: int  # GEMMs per trial
    trials: tuple[float, ...]
    note: str | None = None
    variant: str | None = None


def alpha_gemm(case: GemmCase, seed: int, target_ms: float, trials: int,
               check: Callable[..., float] = rel_error) -> tuple[Timing, float, np.ndarray]:
    """Time alpha_jit's kernel for the case's spec; returns (timing, `check(case, output, A
    values, B values)`: the relative error, output)."""
    from alpha_jit import dtypes
    from alpha_jit.codegen_spirv.generate import generate
    from alpha_jit.runtime import autotune
    from alpha_jit.runtime.device import get_device
    from alpha_jit.runtime.executor import BarrierCmd, DispatchCmd, FillCmd, TimestampCmd

    dev = get_device()
    bt, m, n, k = case.batch, case.m, case.n, case.k
    na, nb = case.a.elements(bt, m, k), case.b.elements(bt, k, n)
    out_bytes = bt * m * n * _ITEMSIZE[case.out_dtype]
    _check_limits(case, dev.caps, na, nb, out_bytes)  # before any data is made
    binary = generate(_tuned(case.spec(), dev), dev.caps)
    [pipe] = dev.pipelines.begin_build().pipelines([binary])
    sa, va = operand_data(case.a.dtype, na, seed)
    sb, vb = operand_data(case.b.dtype, nb, seed + 7919)
    # the reference multiplies what the kernel does: operands rounded on load, rounded
    va, vb = (dtypes.bf16_to_f32(dtypes.f32_to_bf16(v)) if r == "bf16" else v
              for v, r in ((va, case.a_round), (vb, case.b_round)))
    regions, recordings = [], []
    try:
        for arr in (sa, sb):
            r = dev.alloc(arr.nbytes)
            regions.append(r)
            dev.upload(r, arr)
        out = dev.alloc(-(-out_bytes // 4) * 4)  # whole words: the NaN fill covers every byte
        regions.append(out)
        binds = [regions[0], regions[1], out]
        if "workspace_bytes" in binary.notes:  # split-K partial sums
            regions.append(dev.alloc(int(binary.notes["workspace_bytes"])))
            binds.append(regions[-1])

        def record(reps: int) -> Any:
            cmds: list[Any] = [FillCmd(out, value=_NAN_FILL[case.out_dtype]), BarrierCmd(),
                               TimestampCmd("start")]
            for rep in range(reps):
                for j, d in enumerate(binary.dispatches):
                    if rep or j:  # repeats, and split dispatches of one kernel, are ordered
                        cmds.append(BarrierCmd())
                    cmds.append(DispatchCmd(pipe, binds, d))
            cmds.append(TimestampCmd("end"))
            rec = dev.record(cmds, name=f"bench {case.spec().name} x{reps}")
            recordings.append(rec)
            return rec

        use_stamps = bool(dev.caps.timestamp_compute)

        def run(rec: Any) -> float:
            import time

            t0 = time.perf_counter()
            dev.wait(rec.submit())
            wall = (time.perf_counter() - t0) * 1e3
            if not use_stamps:
                return wall
            stamps = dict(rec.timestamps())
            return (stamps["end"] - stamps["start"]) / 1e6

        one = record(1)
        run(one)  # warm-up: first touch of the buffers, the driver's lazy pipeline work
        autotune.warm_clocks(lambda: run(one))  # clocks ramp up from idle
        first = run(one)
        reps = int(min(MAX_REPS, max(1, math.ceil(target_ms / max(first, 1e-3)))))
        timed = record(reps)
        times = tuple(run(timed) / reps for _ in range(trials))
        raw = dev.download_array(out, (bt, m, n), _NP_STORAGE[case.out_dtype])
        got = dtypes.bf16_to_f32(raw) if case.out_dtype == "bf16" else raw.astype(np.float32)
    finally:
        for rec in recordings:
            rec.release()
        for r in regions:
            dev.free(r)
    note = None if use_stamps else "no GPU timestamps on this queue: wall clock of submit+wait"
    return Timing(median(times), reps, times, note, binary.variant), check(case, got, va, vb), got


def _tuned(spec: Any, dev: Any) -> Any:
    """The spec with the tiling a step would run it with (autotuned on this device, cached)."""
    from alpha_jit.codegen_spirv.lower import LoweredKernel
    from alpha_jit.runtime import autotune

    k = LoweredKernel(spec, [], [], [], None)  # type: ignore[arg-type]
    autotune.resolve([k], dev.caps, dev, {})  # a split-K workspace: alpha_gemm binds one
    return k.spec


def _check_limits(case: GemmCase, caps: Any, na: int, nb: int, out_bytes: int) -> None:
    """A buffer the device cannot bind or allocate fails here, naming the buffer and limit."""
    from alpha_jit.errors import AlphaJitError

    for what, nbytes in (("operand A", na * _ITEMSIZE[case.a.dtype]),
                         ("operand B", nb * _ITEMSIZE[case.b.dtype]), ("the output", out_bytes)):
        for limit_name, limit in (("maxStorageBufferRange", caps.max_storage_buffer_range),
                                  ("maxMemoryAllocationSize", caps.max_memory_allocation_size)):
            if nbytes > limit:
                raise AlphaJitError(f"{what} takes {nbytes} bytes, over {caps.name}'s "
                                    f"{limit_name} ({limit} bytes)")


# ---- torch --------------------------------------------------------------------------------------
def torch_gemm(case: GemmCase, target_ms: float, trials: int) -> tuple[Timing, str]:
    """torch.matmul on CUDA over operands of the same layout; returns (timing, out dtype)."""
    import torch

    tdt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
    bt, m, n, k = case.batch, case.m, case.n, case.k

    def operand(op: Operand, rows: int, cols: int, rounded: str | None) -> Any:
        # an operand the kernel rounds on load is a bf16 operand to torch (what autocast has)
        dt = tdt[rounded or op.dtype]
        flat = torch.randn(op.elements(bt, rows, cols), device="cuda", dtype=dt)
        view = flat.as_strided((bt, rows, cols), (op.sb, op.s0, op.s1), op.offset)
        return view[0] if bt == 1 else view  # batch 1: a plain 2-D GEMM, as the step's are

    a, b = operand(case.a, m, k, case.a_round), operand(case.b, k, n, case.b_round)
    want = tdt[case.out_dtype]
    notes = []
    if want == a.dtype:
        def fn() -> Any:
            return torch.matmul(a, b)
    else:  # 16-bit operands, f32 output: cuBLAS can write it directly where torch exposes it
        op = torch.mm if a.dim() == 2 else torch.bmm
        try:
            op(a, b, out_dtype=want)

            def fn() -> Any:
                return op(a, b, out_dtype=want)
        except (TypeError, RuntimeError, NotImplementedError) as e:
            notes.append(f"torch wrote {case.a.dtype}, alpha_jit {case.out_dtype} (no "
                         f"{op.__name__} out_dtype here: {short_error(e, 120)})")

            def fn() -> Any:
                return torch.matmul(a, b)
    if case.a.dtype == "f32" and not case.a_round \
            and torch.get_float32_matmul_precision() != "highest":
        notes.append(f"torch f32 matmul precision is "
                     f"{torch.get_float32_matmul_precision()!r} (TF32)")
    wrote = fn().dtype
    out_dtype = {v: k for k, v in tdt.items()}.get(wrote, str(wrote))
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    first = start.elapsed_time(end)
    reps = int(min(MAX_REPS, max(1, math.ceil(target_ms / max(first, 1e-3)))))
    times = []
    for _ in range(trials):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return Timing(median(times), reps, tuple(times), "; ".join(notes) or None), out_dtype


# ---- the bench ----------------------------------------------------------------------------------
def bench(cases: Iterable[GemmCase], env: Environment, seed: int = 0, target_ms: float = 60.0,
          trials: int = 3, check: Callable[..., float] = rel_error) -> Iterable[GemmRow]:
    """Measure each case on both sides; yields one row per case as it is measured. `check`
    scores alpha_jit's output (tests pass one that sees a deliberately wrong output)."""
    for i, case in enumerate(cases):
        label = f"{case.a.dtype} {case.batch}x{case.m}x{case.n}x{case.k} {case.layout}"
        log(f"gemm {label} ({', '.join(case.uses)})")
        why: dict[str, str] = {}
        notes: list[str] = []
        alpha_ms = alpha_tf = rel = variant = None
        status, error, valid = "ok", None, True
        tol = tolerance(case)
        if env.why_no_alpha:
            status, error, valid = "does not run", env.why_no_alpha, False
        else:
            try:
                t, rel, _ = alpha_gemm(case, seed + 104729 * i, target_ms, trials, check)
                variant = t.variant
                if t.note:
                    notes.append(t.note)
                if rel <= tol:
                    alpha_ms, alpha_tf = t.ms, case.flops / (t.ms * 1e-3) / 1e12
                elif math.isinf(rel):
                    status, valid = "INVALID", False
                    error = "alpha_jit's output holds NaN or inf (the inputs are finite)"
                    why["check_rel_err"] = error
                else:
                    status, valid = "INVALID", False
                    error = (f"alpha_jit's output is wrong: relative L2 error {rel:.3g} > "
                             f"tolerance {tol:.3g} against a float64 numpy GEMM")
            except Exception as e:  # a shape that cannot run here is a row, not the end
                status, error, valid = "does not run", short_error(e), False
        if alpha_ms is None:
            why["alpha_ms"] = why["alpha_tflops"] = error or "not measured"
        torch_ms = torch_tf = None
        torch_out = None
        if not env.torch_timed:
            why["torch_ms"] = why["torch_tflops"] = env.why_no_torch or "torch not timed"
        else:
            try:
                tt, torch_out = torch_gemm(case, target_ms, trials)
                torch_ms, torch_tf = tt.ms, case.flops / (tt.ms * 1e-3) / 1e12
                if tt.note:
                    notes.append(tt.note)
            except Exception as e:
                why["torch_ms"] = why["torch_tflops"] = f"torch failed: {short_error(e)}"
            finally:
                _torch_free()
        ratio = None
        if alpha_tf is not None and torch_tf:
            ratio = alpha_tf / torch_tf
        else:
            why["ratio"] = why.get("alpha_ms") or why.get("torch_ms") or "one side is missing"
        if rel is None:
            why["check_rel_err"] = error or "not checked"
        if torch_out is None:
            why["torch_out_dtype"] = why.get("torch_ms", "not measured")
        yield GemmRow(valid, status, error, why, tuple(notes), **env.json_fields(),
                      dtype=case.a.dtype, out_dtype=case.out_dtype, batch=case.batch, m=case.m,
                      n=case.n, k=case.k, layout=case.layout, uses=case.uses, flops=case.flops,
                      alpha_ms=alpha_ms, alpha_tflops=alpha_tf, torch_ms=torch_ms,
                      torch_tflops=torch_tf, ratio=ratio, check_rel_err=rel, check_tol=tol,
                      torch_out_dtype=torch_out, variant=variant)


def _torch_free() -> None:
    from benchmarks.environment import import_torch

    torch = import_torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next shape, and alpha_jit's Vulkan memory, get it back
