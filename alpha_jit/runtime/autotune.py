"""GEMM tilings per shape: measured on the device once, cached on disk, then deterministic.

Why: which tile wins depends on the shape and the GPU (a 768 x 768 weight gradient over K = 8192
has 36 tiles of 128 x 128 for 132 multiprocessors; a 8192 x 50304 logits GEMM has thousands),
and a heuristic guesses. Before the step's kernels are generated, every matmul kernel gets an
explicit ("config", ...) param: the measured best for its bare GEMM (the same operands, shapes,
strides, rounding and column sums, f32 output, no epilogue) when tuning is on, else the generator's
heuristic. The choice travels in the spec, so the kernel caches key on it and a plan is
reproducible.

- Measuring: each tiling of a short list (`matmul_coopmat.search`, plus the heuristic choice)
  is generated, compiled (all shapes' candidates at once, on several threads), dispatched back
  to back on scratch buffers and timed with GPU timestamps; a progress bar shows it, and it
  happens once per shape and device.
- Cache: `$ALPHA_JIT_CACHE_DIR/<device fingerprint>/autotune-<codegen version>.json`, plain JSON
  (bare spec key -> chosen config and the timings), written atomically. A plan made without a
  device (`--plan-only`) reads it too.
- `ALPHA_JIT_AUTOTUNE=0`: no measuring and no cache, the heuristic choice everywhere.
  `ALPHA_JIT_COOPMAT=0` keeps every GEMM on SIMT tiles (and out of the tuner's search).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alpha_jit import dtypes
from alpha_jit.codegen_spirv import disk_cache
from alpha_jit.codegen_spirv.generate import codegen_version, generate
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels import matmul, matmul_coopmat
from alpha_jit.codegen_spirv.lower import Buffer
from alpha_jit.errors import AlphaJitError

log = logging.getLogger("alpha_jit.autotune")

_TARGET_S = 2e-3  # GPU time per candidate measurement (back-to-back dispatches)
# K sums of b or a are timed too: they change which tile wins (registers, shared memory)
_BARE_KEYS = ("batch", "m", "n", "k", "a", "b", "a_round", "b_round", "colsum_b", "rowsum_a")
_LOCK = threading.Lock()


def enabled() -> bool:
    """ALPHA_JIT_AUTOTUNE=0 turns measuring and the tuned-config cache off."""
    return os.environ.get("ALPHA_JIT_AUTOTUNE", "1") != "0"


def bare_spec(spec: KernelSpec) -> KernelSpec:
    """The GEMM of `spec` without its epilogue's loads and math but with the K sums of b or a,
    its output dtype (an epilogue's first output's) and its store path: what is timed, and
    the key tuned results are shared under."""
    params = tuple((k, v) for k, v in spec.params if k in _BARE_KEYS)
    p = dict(spec.params)
    out = p["out_dtype"]
    # a GEMM with an epilogue is timed through the store path its tiles give that epilogue
    # (matmul_coopmat.store_path), not the direct one a bare f32 output could take (on the
    # LM head that ranked tiles 2x apart differently)
    if "epilogue" in p:
        params += (("epilogue_store", matmul_coopmat.epilogue_kind(p)),)
        out = p["epilogue"][2][0][0]
    return KernelSpec("matmul", "tune_" + spec.name, params + (("out_dtype", out),))


@dataclass(frozen=True)
class Tuned:
    """One shape's measured choice."""

    config: tuple  # MatmulConfig.to_param()
    timings_us: dict  # config label -> microseconds per dispatch


def cache_path(caps: Any) -> Path:
    return disk_cache.cache_dir(caps.fingerprint()) / f"autotune-{codegen_version()}.json"


def _load(path: Path) -> dict[str, Tuned]:
    try:
        raw = json.loads(path.read_text())
        return {k: Tuned(tuple(v["config"]), dict(v["timings_us"])) for k, v in raw.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # hand-edited or truncated
        log.warning("ignoring the autotune cache %s (%s); GEMMs are measured again", path, exc)
        return {}


def _store(path: Path, entries: dict[str, Tuned]) -> None:
    data = {k: {"config": list(t.config), "timings_us": t.timings_us}
            for k, t in sorted(entries.items())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        disk_cache.atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())
    except OSError as exc:
        disk_cache.note_unwritable(path, exc)


def _with_config(spec: KernelSpec, cfg: matmul.MatmulConfig) -> KernelSpec:
    params = tuple((k, v) for k, v in spec.params if k != "config")
    return KernelSpec(spec.family, spec.name, params + (("config", cfg.to_param()),))


def _candidates(spec: KernelSpec, caps: Any, short: bool = False) -> list[matmul.MatmulConfig]:
    """The tilings a spec may run with (`short`: the tuner's short list), the heuristic's
    choice included."""
    p = dict(spec.params)
    if not matmul.coopmat_allowed():
        out = []
    else:
        out = (matmul_coopmat.search if short else matmul_coopmat.candidates)(p, caps)
    heuristic = matmul.choose_config(spec, caps)
    return out + ([heuristic] if heuristic not in out else [])


def tunable(kernel: Any) -> bool:
    """Whether `resolve` gives this LoweredKernel a tiling (its spec changes)."""
    return kernel.spec.family == "matmul" and "config" not in dict(kernel.spec.params)


def resolve(kernels: list[Any], caps: Any, device: Any = None,
            buffers: dict[int, Any] | None = None,
            on_compiling: Callable[[], None] | None = None) -> None:
    """Give every matmul kernel of `kernels` (LoweredKernel, spec replaced in place) an explicit
    config: tuned (measured now if `device` is given and the shape is new), else heuristic.
    A split-K config's f32 workspace becomes a temporary in `buffers` (the lowering's), bound
    after the kernel's other writes and live only in that kernel. `on_compiling()` runs once:
    as soon as the candidates' driver compiles are queued (the caller's other work overlaps
    them and the timing), else before returning."""
    called = on_compiling is None

    def overlap() -> None:
        nonlocal called
        if not called:
            called = True
            on_compiling()  # type: ignore[misc]

    _resolve(kernels, caps, device, buffers, overlap)
    overlap()


def _resolve(kernels: list[Any], caps: Any, device: Any, buffers: dict[int, Any] | None,
             overlap: Callable[[], None]) -> None:
    gemms = [k for k in kernels if tunable(k)]
    if not gemms:
        return
    # timestamps are how candidates are compared: no timestamps, no tuning
    tuning = enabled() and caps is not None and caps.device_type != "cpu" \
        and bool(getattr(caps, "timestamp_compute", False))
    path = cache_path(caps) if tuning else None
    with _LOCK:
        entries = _load(path) if path is not None else {}
        todo: dict[str, tuple[KernelSpec, list[matmul.MatmulConfig]]] = {}
        for k in gemms if tuning and device is not None else []:
            bare = bare_spec(k.spec)
            if bare.key() not in entries and bare.key() not in todo:
                cands = _candidates(bare, caps, short=True)
                # one candidate (no cooperative matrices, ALPHA_JIT_COOPMAT=0): nothing to time
                if len(cands) > 1:
                    todo[bare.key()] = (bare, cands)
        if todo:
            t0 = time.perf_counter()
            # every candidate generated, then compiled by the driver on several threads
            built = {key: [(cfg, generate(_with_config(bare, cfg), caps)) for cfg in cands]
                     for key, (bare, cands) in todo.items()}
            t1 = time.perf_counter()
            binaries = [b for cands in built.values() for _, b in cands]
            device.pipelines.prefetch(binaries)  # queued first: they compile first
            overlap()
            device.pipelines.get_many(binaries)
            t2 = time.perf_counter()
            for key, (bare, _) in tqdm(todo.items(), desc="alpha_jit: tuning GEMM tiles",
                                       unit="shape", leave=False, disable=len(todo) < 2):
                try:
                    entries[key] = _measure(device, bare, built[key])
                except AlphaJitError as exc:  # e.g. its scratch over a device limit
                    log.warning("autotune: %s not measured (%s); the heuristic tiling is used",
                                bare.name, exc)
            _store(path, entries)  # type: ignore[arg-type]
            device.synchronize()
            device.memory.trim()  # the scratch must not stay reserved beside the step's memory
            # where a cold build's tuning goes (the bench's compile probe shows the total)
            log.info("autotune: %d shapes, %d candidates: generated in %.2f s, compiled in "
                     "%.2f s (with the caller's overlapping work), timed in %.2f s",
                     len(todo), sum(len(c) for _, c in todo.values()),
                     t1 - t0, t2 - t1, time.perf_counter() - t2)
    chosen: dict[tuple, matmul.MatmulConfig] = {}  # by params: a layer's GEMMs repeat
    for k in gemms:
        cfg = chosen.get(k.spec.params)
        if cfg is None:
            cfg = matmul.choose_config(k.spec, caps)
            tuned = entries.get(bare_spec(k.spec).key())
            if tuned is not None:
                want = matmul.MatmulConfig(*tuned.config)
                # the full spec may not fit the tuned tile (its column sums need shared memory)
                if want in _candidates(k.spec, caps):
                    cfg = want
            chosen[k.spec.params] = cfg
        k.spec = _with_config(k.spec, cfg)
        if cfg.split > 1 and buffers is not None:
            size = matmul_coopmat.workspace_bytes(dict(k.spec.params), cfg) // 4
            bid = min(min(buffers, default=0), 0) - 1  # negative: no graph node's id
            buffers[bid] = Buffer(bid, "temp", (size,), dtypes.float32)
            k.writes.append(bid)


_WARM_S = 1.0
_warm = False


def warm_clocks(run: Callable[[], object]) -> None:
    """Keep the GPU busy (`run` submits work and waits) for _WARM_S once per process before
    the first measurement: from idle, the H200 ran the first GEMM at a quarter of its speed
    (24 vs 111 TFLOP/s at 4096^3), which would rank tiles by clock speed instead of by shape.
    The GEMM benchmark uses it too."""
    global _warm
    import time

    end = time.perf_counter() + _WARM_S
    while not _warm and time.perf_counter() < end:
        run()
    _warm = True


def _measure(dev: Any, bare: KernelSpec, built: list[tuple[Any, Any]]) -> Tuned:
    """Time every candidate (config, binary) of a bare GEMM on scratch buffers; the fastest
    wins."""
    from alpha_jit.runtime.executor import BarrierCmd, DispatchCmd, FillCmd, TimestampCmd

    p = dict(bare.params)
    sizes = []
    for key, rows, cols in (("a", p["m"], p["k"]), ("b", p["k"], p["n"])):
        dt, off, sb, s0, s1 = p[key]
        dt = "f32" if p.get(f"{key}_round") else dt
        count = off + (p["batch"] - 1) * sb + (rows - 1) * s0 + (cols - 1) * s1 + 1
        sizes.append(count * (2 if dt in ("bf16", "f16") else 4))
    sizes.append(4 * p["batch"] * p["m"] * p["n"])
    if p.get("colsum_b") or p.get("rowsum_a"):  # the K sums of b or a, after the product
        sizes.append(4 * (p["n"] if p.get("colsum_b") else p["m"]))
    regions = [dev.alloc(max(s, 4)) for s in sizes]
    workspace: dict[int, Any] = {}  # split-K workspaces by size, shared by the candidates
    flops = 2 * p["batch"] * p["m"] * p["n"] * p["k"]
    reps = max(2, min(50, math.ceil(_TARGET_S / max(flops / 100e12, 1e-7))))
    timings: dict[str, float] = {}
    best: tuple[float, tuple] | None = None
    try:
        fill = [FillCmd(r) for r in regions[:2]] + [BarrierCmd()]  # zeros, not stale NaNs
        rec = dev.record(fill, name="autotune fill")
        dev.wait(rec.submit())
        rec.release()
        for cfg, binary in built:
            pipe = dev.pipeline(binary)
            binds = list(regions)
            cmds: list[Any] = [TimestampCmd("start")]
            try:  # a candidate that cannot run (a range over a limit) is skipped, not the shape
                if cfg.split > 1:
                    nbytes = int(binary.notes["workspace_bytes"])
                    if nbytes not in workspace:
                        workspace[nbytes] = dev.alloc(nbytes)
                    binds.append(workspace[nbytes])
                for _ in range(reps):
                    for d in binary.dispatches:  # split-K's passes are ordered, as in a step
                        cmds += [DispatchCmd(pipe, binds, d), BarrierCmd()]
                cmds.append(TimestampCmd("end"))
                rec = dev.record(cmds, name=f"autotune {cfg.label()}")
            except AlphaJitError as exc:
                log.warning("autotune %s: %s not measured (%s)", bare.name, cfg.label(), exc)
                continue
            try:
                warm_clocks(lambda r=rec: dev.wait(r.submit()))
                dev.wait(rec.submit())  # warm-up: caches
                dev.wait(rec.submit())
                stamps = dict(rec.timestamps())
            finally:
                rec.release()
            us = (stamps["end"] - stamps["start"]) / reps / 1e3
            timings[cfg.label()] = round(us, 2)
            if best is None or us < best[0]:
                best = (us, cfg.to_param())
    finally:
        for r in [*regions, *workspace.values()]:
            dev.free(r)
    if best is None:
        raise AlphaJitError(f"autotune {bare.name}: no candidate could be measured")
    log.info("autotune %s: %s", bare.name, timings)
    return Tuned(best[1], timings)
