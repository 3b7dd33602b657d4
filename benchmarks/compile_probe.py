"""Cold and warm compile time of alpha_jit's training step, each in a fresh Python process.

Why a process: inside the bench's own process every cache is already warm (kernels generated
for the GEMM rows, pipelines built for the in-process run), and nothing can be un-imported. So
`measure()` runs `python -m benchmarks.compile_probe` twice against one new, empty set of cache
folders: alpha_jit's (`ALPHA_JIT_CACHE_DIR`: SPIR-V and the VkPipelineCache) and the drivers'
own shader caches (`MESA_SHADER_CACHE_DIR` for Mesa, `__GL_SHADER_DISK_CACHE_PATH` for NVIDIA).
The first run starts cold; the second finds what the first one stored: that is what a user
sees on the second launch of a training script. Each probe times its first call of the step up
to the first loss read (tracing, passes, lowering, kernel generation, pipeline builds, memory,
recording, one step); imports, the model's initialisation and creating the Vulkan device are
outside the timing.

The probe prints one JSON object as its last line of stdout: compile_s, loss, the build's
phases (`runtime.step.BuildTimes`: trace, passes, plan, tune, generate, pipelines, memory,
record; the rest of compile_s is the first step) and the kernel cache counters (generated,
read from disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.configs import BenchConfig

last_builds: dict[str, str] = {}  # "cold"/"warm" -> that probe's build phases
_DRIVER_CACHES = ("MESA_SHADER_CACHE_DIR", "MESA_GLSL_CACHE_DIR", "__GL_SHADER_DISK_CACHE_PATH")


def probe_env(root: Path) -> dict[str, str]:
    """The environment of a probe: every cache folder under `root`, the package importable."""
    env = dict(os.environ)
    env["ALPHA_JIT_CACHE_DIR"] = str(root / "alpha_jit")
    for var in _DRIVER_CACHES:
        env[var] = str(root / var.strip("_").lower())
    env["__GL_SHADER_DISK_CACHE"] = "1"  # NVIDIA: caching on, in the folder above
    env["__GL_SHADER_DISK_CACHE_SKIP_CLEANUP"] = "1"
    repo = str(Path(__file__).resolve().parent.parent)  # the folder holding `benchmarks/`
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("ALPHA_JIT_PROFILE", None)  # a profiled step records differently
    # a user's second run finds the first one's bytecode: without it the warm probe compiled
    # ~20 lazily imported modules inside the build (the H200 machine sets this variable)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _run_once(args: list[str], env: dict[str, str], timeout_s: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_probe", *args], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"compile probe exited with status {proc.returncode}: {tail}")
    return json.loads(lines[-1])


def measure(bc: BenchConfig, precision: str, seed: int,
            timeout_s: float = 900.0) -> tuple[float | None, float | None, str | None]:
    """(cold seconds, warm seconds, note or why missing) for `bc`'s step at `precision`.
    `last_builds` then holds each process's build phases (`BuildTimes.format()`)."""
    last_builds.clear()
    root = Path(tempfile.mkdtemp(prefix="alpha_jit_bench_compile_"))
    args = ["--config", bc.label, "--precision", precision, "--seed", str(seed)]
    env = probe_env(root)
    cold = warm = None
    try:
        first = _run_once(args, env, timeout_s)
        cold = float(first["compile_s"])
        last_builds["cold"] = str(first.get("build", ""))
        second = _run_once(args, env, timeout_s)
        warm = float(second["compile_s"])
        last_builds["warm"] = str(second.get("build", ""))
    except subprocess.TimeoutExpired:
        return cold, warm, f"a probe process ran past {timeout_s:.0f} s and was stopped"
    except Exception as e:
        return cold, warm, f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    note = None
    if second.get("generated"):
        note = (f"the warm process still generated {second['generated']} kernels (the disk "
                "cache did not serve them)")
    if first.get("loss") != second.get("loss"):
        note = ((note + "; ") if note else "") + (
            f"first losses differ between the two processes: {first.get('loss')} vs "
            f"{second.get('loss')}")
    return cold, warm, note


def main(argv: list[str] | None = None) -> int:
    """The probe process: build the step, time its first call to the first loss read."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_probe")
    ap.add_argument("--config", required=True, help="NAME or NAME@BATCH")
    ap.add_argument("--precision", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from benchmarks import configs, training

    bc = configs.resolve(args.config)
    model = training.alpha_model(bc, args.seed)
    step = training.alpha_step(model, args.precision)
    x, y = training.batch(bc, args.seed)
    from alpha_jit.codegen_spirv import generate
    from alpha_jit.runtime.device import get_device

    get_device()  # the Vulkan instance and device are not compile time
    t0 = time.perf_counter()
    loss = float(step(x, y))
    seconds = time.perf_counter() - t0
    exe = next(e for es in step.cache.values() for e in es)
    print(json.dumps({"compile_s": seconds, "loss": loss, "build": exe.build_times.format(),
                      "generated": generate.COUNTS["generated"],
                      "from_disk": generate.COUNTS["disk"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
