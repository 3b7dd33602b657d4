"""The `alpha-jit` command: devices, dump-ir, profile, bench.

`devices` lists every Vulkan device with the capabilities alpha_jit specialises on and the
kernel variants each would get (`--json`: the file `--device-caps` reads). `dump-ir SCRIPT
[ARGS]` runs a user script until its first compiled step has been built, then prints every
stage: the graph after tracing, after autodiff, after each pass, the kernel list, the memory
plan; `--kernel N` adds kernel N's SPIR-V, `--json` one machine-readable object,
`--plan-only`/`--device-caps FILE` plan (for another machine's device) without running.
`profile SCRIPT [ARGS]` takes over the script's first compiled call and reports where the
step's GPU time goes, per kernel, down to source lines (`runtime/profiler.py`). `bench` is the
entry of `benchmarks/` (alpha_jit vs PyTorch on the same GPU).

User errors (a script that does not exist, a kernel index out of range, an unknown device)
print `alpha-jit <command>: error: <message>` and exit with status 2, before anything is run
or printed where that can be known; internal failures keep their traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import runpy
import sys
from pathlib import Path
from typing import Any

from alpha_jit.train.config import error_message, is_user_error, nonneg_int, positive_int


def variants(caps: Any) -> dict[str, str]:
    """Which kernel variant each precision and kernel family gets on a device."""
    from alpha_jit.codegen_spirv.kernel import KernelSpec
    from alpha_jit.codegen_spirv.kernels.matmul import choose_config

    probe = KernelSpec("matmul", "probe", (("batch", 1), ("m", 1024), ("n", 1024), ("k", 1024),
                                           ("a", ("f32", 0, 0, 1024, 1)),
                                           ("b", ("f32", 0, 0, 1024, 1)), ("out_dtype", "f32")))
    cfg = choose_config(probe, caps)
    gemm = f"{cfg.variant} GEMM {cfg.tm}x{cfg.tn}x{cfg.bk} (micro-tile {cfg.rm}x{cfg.rn})"
    low16 = "16-bit storage" if caps.storage_buffer_16bit else "packed in 32-bit words"
    bf16 = "native bf16 (SPV_KHR_bfloat16)" if caps.bfloat16 and caps.storage_buffer_16bit \
        else "emulated bf16 (u16 bits + shifts)"
    return {
        "f32": f"f32 storage, {gemm}",
        "bf16": f"GEMM inputs {bf16} ({low16}), f32 accumulate, f32 master weights",
        "f16": f"GEMM inputs f16 ({low16}), f32 accumulate, dynamic loss scaling on the GPU",
        "reductions": f"subgroup ops (subgroup {caps.subgroup_size})"
        if caps.subgroup_arithmetic else "shared memory",
    }


def _probed(c: Any) -> Any:
    """The selected device's record with its fragment layouts, probed on the open device (as
    enumerated, with a warning, where the device does not open)."""
    from alpha_jit.runtime.device import get_device

    try:
        return get_device().caps
    except Exception as e:  # noqa: BLE001 - the listing still says what the device lists
        print(f"alpha-jit devices: {c.name} did not open ({e}); fragment layouts not probed",
              file=sys.stderr)
        return c


def cmd_devices(args: argparse.Namespace) -> int:
    from alpha_jit.runtime.capabilities import enumerate_devices, select_device

    devs = enumerate_devices()
    chosen = select_device(devs).index if devs else None
    if args.json:
        out = []
        for c in devs:
            if c.index == chosen and c.cooperative_matrix:
                c = _probed(c)
            d = c.to_json()
            d["fingerprint"] = c.fingerprint()
            d["selected"] = c.index == chosen
            d["variants"] = variants(c)
            out.append(d)
        print(json.dumps(out, indent=2, default=str))
        return 0
    head = f"{'#':>2}  {'name':<34} {'type':<10} {'vulkan':<9} {'f16':<4} {'bf16':<5} " \
           f"{'coopmat':<8} {'subgrp':<7} {'shared':<7}"
    print(head)
    print("-" * len(head))
    for c in devs:
        mark = "*" if c.index == chosen else " "
        coop = str(len(c.cooperative_matrix)) if c.cooperative_matrix else "no"
        print(f"{c.index:>2}{mark} {c.name[:34]:<34} {c.device_type:<10} {c.api_version:<9} "
              f"{'yes' if c.float16 else 'no':<4} {'yes' if c.bfloat16 else 'no':<5} "
              f"{coop:<8} {c.subgroup_size:<7} {c.max_shared_memory // 1024:>4} KiB")
    print("\n* = selected (set ALPHA_JIT_DEVICE=<index|name> to choose another)")
    for c in devs:
        print(f"\nkernel variants on {c.index}: {c.name}")
        for k, v in variants(c).items():
            print(f"  {k:<11} {v}")
    return 0


class _StopScript(BaseException):
    """Ends the user's script once the tool has what it needs; a BaseException so that a
    script's own `except Exception` cannot swallow it."""


class _ToolError(_StopScript):
    """A user error found only once the step exists (e.g. --kernel out of range)."""


def _runnable(script: str) -> str | None:
    """Why `script` cannot be run by runpy.run_path, or None if it can."""
    path = Path(script)
    if path.is_file():
        return None
    if path.is_dir():
        return None if (path / "__main__.py").is_file() else \
            f"script {script}: is a folder without __main__.py"
    return f"script {script}: no such file"


def _run_script(args: argparse.Namespace, quiet_stdout: bool) -> bool:
    """Run the user's script until a hook raises _StopScript; True if one did. With
    `quiet_stdout` the script's prints go to standard error (stdout carries the JSON)."""
    sys.argv = [args.script, *args.script_args]
    out = contextlib.redirect_stdout(sys.stderr) if quiet_stdout else contextlib.nullcontext()
    try:
        with out:
            runpy.run_path(args.script, run_name="__main__")
    except _ToolError as e:
        args.parser.error(str(e))
    except _StopScript:
        return True
    print(f"{args.script} finished without calling a compiled step", file=sys.stderr)
    return False


def _stages(traced: Any, plan: Any) -> list[dict[str, Any]]:
    stages = [{"name": title, "nodes": len(g)} for title, g in traced.snapshots]
    stages += [{"name": f"pass {name}", "nodes": len(g), "summary": summary}
               for name, summary, g in traced.pass_history]
    stages.append({"name": "schedule", "nodes": len(traced.graph),
                   "kernels": len(plan.kernels),
                   "dispatches": sum(len(k.grid) for k in plan.kernels)})
    return stages


def _format_memory(plan: Any) -> str:
    m = plan.to_json()
    lines = [f"== memory plan: peak {m['peak_bytes'] / 2**20:.2f} MiB in "
             f"{len(m['allocations'])} allocations ==", f"  {plan.memory.format()}",
             f"  barriers: {m['barriers']} between {len(plan.kernels)} kernels"]
    for r in sorted(m["regions"], key=lambda r: -r["bytes"])[:8]:
        lines.append(f"  {r['bytes'] / 2**20:10.2f} MiB  {r['heap']:<8} {r['what']}")
    if len(m["regions"]) > 8:
        lines.append(f"  ... {len(m['regions']) - 8} smaller")
    lines += [f"  DOES NOT FIT: {p}" for p in m["problems"]]
    return "\n".join(lines)


def cmd_dump_ir(args: argparse.Namespace) -> int:
    problem = _runnable(args.script)
    if problem is not None:
        args.parser.error(problem)
    from alpha_jit.codegen_spirv import tools
    from alpha_jit.runtime import caps as caps_mod
    from alpha_jit.runtime.step_plan import validate_spirv

    plan_only = args.plan_only or args.device_caps is not None
    target = None
    if args.device_caps is not None:
        target = caps_mod.load(args.device_caps)  # a bad file fails before the script runs
    elif plan_only:
        from alpha_jit.runtime.capabilities import select_device

        target = select_device()  # this machine's device, queried but not opened
    # the package's `compile` attribute is the decorator; the module holds the hook
    compile_mod = importlib.import_module("alpha_jit.compile")

    def hook(traced: Any, plan: Any, exe: Any) -> None:
        n = len(plan.binaries)
        if args.kernel is not None and args.kernel >= n:  # checked before printing anything
            raise _ToolError(f"--kernel {args.kernel}: the step has {n} kernels (0..{n - 1})")
        checked = validate_spirv(plan) if plan_only else None
        if args.json:
            out = {"device": plan.caps.name, "device_fingerprint": plan.caps.fingerprint(),
                   "plan_only": plan_only, "spirv_validated": checked,
                   "stages": _stages(traced, plan),
                   "kernels": [k.to_json() for k in plan.kernels], "memory": plan.to_json()}
            if args.kernel is not None:
                out["kernel_spirv"] = tools.disassemble(plan.binaries[args.kernel].words)
            print(json.dumps(out), file=sys.__stdout__)
            raise _StopScript
        for title, g in traced.snapshots:
            print(g.format(title), end="\n\n")
        for name, summary, g in traced.pass_history:
            print(f"-- pass {name}: {summary}")
            print(g.format(f"after pass {name}"), end="\n\n")
        print(f"== planned for {plan.caps.name}" + (" (plan only: nothing created on a "
              f"device; {checked} distinct modules pass spirv-val)" if plan_only else ""))
        print(plan.lowered.format())
        print("\n" + _format_memory(plan))
        if args.kernel is not None:
            b, info = plan.binaries[args.kernel], plan.kernels[args.kernel]
            print(f"\n== kernel {args.kernel}: {b.name} ({b.spec.family}, {info.variant}) ==")
            print(f"grid: {list(info.grid)} x local {info.local_size}; {info.bytes} bytes, "
                  f"{info.flops} flops; from {', '.join(info.sources)}")
            print(f"spec: {b.spec.params}")
            print(tools.disassemble(b.words, b.name))
        raise _StopScript

    compile_mod.set_build_hook(hook, plan_only=target if plan_only else None)
    try:
        return 0 if _run_script(args, quiet_stdout=args.json) else 1
    finally:
        compile_mod.set_build_hook(None)


def cmd_profile(args: argparse.Namespace) -> int:
    problem = _runnable(args.script)
    if problem is not None:
        args.parser.error(problem)
    from alpha_jit.runtime import profiler

    compile_mod = importlib.import_module("alpha_jit.compile")
    busy = False

    def hook(fn: Any, exe: Any, call_args: tuple) -> None:
        nonlocal busy
        if busy or (args.function is not None and fn.__name__ != args.function):
            return
        busy = True  # the profiler's own calls run the step normally
        arrays = list(call_args)

        def call(recording: Any = None) -> Any:
            return fn(*call_args) if recording is None else exe(arrays, recording)

        prof, att = profiler.profile(exe, arrays, args.steps, args.warmup, args.serialize, call)
        if args.trace is not None:
            profiler.write_trace(args.trace, exe.plan, att)
            print(f"alpha-jit profile: wrote a trace of one step to {args.trace} (open it in "
                  "https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
        if args.json:
            print(json.dumps({"function": fn.__name__, **prof.to_json()}), file=sys.__stdout__)
        else:
            print(f"profile of {fn.__name__} ({args.script})")
            print(prof.format(args.top))
        raise _StopScript

    compile_mod.set_call_hook(hook)
    try:
        return 0 if _run_script(args, quiet_stdout=args.json) else 1
    finally:
        compile_mod.set_call_hook(None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alpha-jit", description="alpha_jit tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("devices", help="list Vulkan devices and what alpha_jit would use")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_devices, parser=d)
    p = sub.add_parser("dump-ir", help="print every stage of a script's first compiled step")
    p.add_argument("--kernel", type=nonneg_int, default=None, metavar="N",
                   help="also print kernel N's SPIR-V (0-based)")
    p.add_argument("--json", action="store_true",
                   help="one JSON object on stdout (stages, kernels, memory); the script's own "
                        "output goes to stderr")
    p.add_argument("--plan-only", action="store_true",
                   help="generate and spirv-val the kernels and plan memory, but create no "
                        "pipeline and run nothing")
    p.add_argument("--device-caps", metavar="FILE", default=None,
                   help="plan for the device in FILE (`alpha-jit devices --json` from another "
                        "machine); implies --plan-only")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_dump_ir, parser=p)
    f = sub.add_parser("profile", help="per-kernel GPU time of a script's compiled step")
    f.add_argument("--steps", type=positive_int, default=10, help="timed steps (default 10)")
    f.add_argument("--warmup", type=nonneg_int, default=3, help="untimed steps first")
    f.add_argument("--function", default=None, metavar="NAME",
                   help="the compiled function to profile (default: the first one called)")
    f.add_argument("--json", action="store_true", help="one JSON object on stdout")
    f.add_argument("--trace", metavar="FILE", default=None,
                   help="write one step as a Chrome/Perfetto trace")
    f.add_argument("--serialize", action="store_true",
                   help="a barrier before every kernel: isolated per-kernel times (changes "
                        "the step; said in the report)")
    f.add_argument("--top", type=positive_int, default=None, metavar="N",
                   help="print only the N slowest kernels")
    f.add_argument("script")
    f.add_argument("script_args", nargs=argparse.REMAINDER)
    f.set_defaults(func=cmd_profile, parser=f)
    from benchmarks import cli as bench_cli  # the code lives in benchmarks/; this is its entry

    b = sub.add_parser("bench", help="alpha_jit vs PyTorch: GEMMs and GPT steps on one GPU")
    bench_cli.add_arguments(b)
    b.set_defaults(func=bench_cli.run, parser=b)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug: keep the traceback
        args.parser.error(error_message(e))


if __name__ == "__main__":
    sys.exit(main())
