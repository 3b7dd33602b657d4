"""The `alpha-jit` command: devices, dump-ir.

`devices` lists every Vulkan device with the capabilities alpha_jit specialises on and the
kernel variants each would get. `dump-ir SCRIPT [ARGS]` runs a user script until its first
compiled step has been built, then prints every stage: the graph after tracing, after autodiff,
after each pass, the kernel list, the memory plan; `--kernel N` adds kernel N's SPIR-V.

User errors (a script that does not exist, a kernel index out of range, an unknown device)
print `alpha-jit <command>: error: <message>` and exit with status 2, before anything is run
or printed where that can be known; internal failures keep their traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import runpy
import sys
from pathlib import Path
from typing import Any

from alpha_jit.train.config import error_message, is_user_error, nonneg_int


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


def cmd_devices(args: argparse.Namespace) -> int:
    from alpha_jit.runtime.capabilities import enumerate_devices, select_device

    devs = enumerate_devices()
    chosen = select_device(devs).index if devs else None
    if args.json:
        out = []
        for c in devs:
            d = dataclasses.asdict(c)
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


class _StopAfterFirstStep(BaseException):
    """Ends the user's script once its first step is built; a BaseException so that a script's
    own `except Exception` cannot swallow it."""


class _KernelOutOfRange(_StopAfterFirstStep):
    """--kernel names a kernel the step does not have (known only once it is built)."""


def _runnable(script: str) -> str | None:
    """Why `script` cannot be run by runpy.run_path, or None if it can."""
    path = Path(script)
    if path.is_file():
        return None
    if path.is_dir():
        return None if (path / "__main__.py").is_file() else \
            f"script {script}: is a folder without __main__.py"
    return f"script {script}: no such file"


def cmd_dump_ir(args: argparse.Namespace) -> int:
    problem = _runnable(args.script)
    if problem is not None:
        args.parser.error(problem)
    from alpha_jit.codegen_spirv import tools

    # the package's `compile` attribute is the decorator; the module holds the hook
    compile_mod = importlib.import_module("alpha_jit.compile")

    def hook(traced: Any, exe: Any) -> None:
        n = len(exe.binaries)
        if args.kernel is not None and args.kernel >= n:  # checked before printing anything
            raise _KernelOutOfRange(f"--kernel {args.kernel}: the step has {n} kernels "
                                    f"(0..{n - 1})")
        for title, g in traced.snapshots:
            print(g.format(title), end="\n\n")
        for name, summary, g in traced.pass_history:
            print(f"-- pass {name}: {summary}")
            print(g.format(f"after pass {name}"), end="\n\n")
        print(exe.lowered.format())
        print(f"\n== memory plan ==\n  {exe.mem.format()}")
        print(f"  barriers: {sum(exe.barriers)} between {len(exe.barriers)} kernels")
        if args.kernel is not None:
            b = exe.binaries[args.kernel]
            print(f"\n== kernel {args.kernel}: {b.name} ({b.spec.family}) ==")
            print(f"spec: {b.spec.params}")
            print(tools.disassemble(b.words, b.name))
        raise _StopAfterFirstStep

    compile_mod.set_build_hook(hook)
    sys.argv = [args.script, *args.script_args]
    try:
        runpy.run_path(args.script, run_name="__main__")
    except _KernelOutOfRange as e:
        args.parser.error(str(e))
    except _StopAfterFirstStep:
        return 0
    finally:
        compile_mod.set_build_hook(None)
    print(f"{args.script} finished without calling a compiled step", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alpha-jit", description="alpha_jit tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("devices", help="list Vulkan devices and what alpha_jit would use")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_devices, parser=d)
    p = sub.add_parser("dump-ir", help="print every stage of a script's first compiled step")
    p.add_argument("--kernel", type=nonneg_int, default=None, metavar="N",
                   help="also print kernel N's SPIR-V (0-based)")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_dump_ir, parser=p)
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
