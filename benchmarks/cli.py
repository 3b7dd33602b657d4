"""Arguments and entry of `alpha-jit bench` (the command in alpha_jit/cli.py is a thin entry).

Runs the sections asked for, in this order, each printing its table when done:
  gemm   alpha_jit's matmul kernel vs torch.matmul: 4096^3 and every GEMM of the GPT steps
  step   the GPT training step: alpha_jit vs PyTorch eager and torch.compile, parity-guarded
  sweep  (`--sweep batch`) tokens/s and memory at batch 1, 2, 4, ... until memory runs out
By default gemm and step; `--sweep batch` alone runs only the sweep (add `--only` for more).
Progress goes to stderr, tables to stdout, one JSON object per row to `--json FILE` and/or
`--out DIR` (DIR/bench.jsonl, with the tables in DIR/bench.txt). Exit status 1 when a row is
INVALID (a wrong result or a loss that disagrees with PyTorch), 2 for bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
from pathlib import Path
from typing import IO, Any

from alpha_jit.train.config import nonneg_int, positive_float, positive_int

_GEMM_DTYPES = ("bf16", "f16", "f32")


def _names(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").split() if t]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Declare `alpha-jit bench`'s options on its subparser."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the section list's lines
    p.description = ("alpha_jit side by side with PyTorch on this machine's GPU.\n\n"
                     + (__doc__ or "").split("\n", 2)[2])
    p.add_argument("--only", choices=["gemm", "step"], default=None,
                   help="run one section (default: gemm and step)")
    p.add_argument("--configs", default="small,gpt2", metavar="LIST",
                   help="model configs, NAME or NAME@BATCH: tiny, small, gpt2 (default: "
                        "small,gpt2 at their default batch)")
    p.add_argument("--precision", default=None, metavar="LIST",
                   help="step: bf16 and/or f32 (default bf16); gemm: bf16, f16, f32 (default "
                        "all three); a list given here applies to both")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch size for every config given without @BATCH")
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=nonneg_int, default=5,
                   help="untimed steps after the parity steps")
    p.add_argument("--parity-steps", type=positive_int, default=10,
                   help="steps whose losses are compared with PyTorch eager")
    p.add_argument("--parity-tol", type=positive_float, default=1e-2,
                   help="relative loss difference above which a row is INVALID")
    p.add_argument("--no-compile-time", action="store_true",
                   help="skip the cold/warm compile probes (two fresh processes per row)")
    p.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile rows")
    p.add_argument("--no-torch", action="store_true",
                   help="alpha_jit's side only, even where PyTorch is installed")
    p.add_argument("--sweep", choices=["batch"], default=None,
                   help="batch: 1, 2, 4, ... until memory runs out, on each side")
    p.add_argument("--sweep-max", type=positive_int, default=1024, metavar="B",
                   help="largest batch the sweep tries")
    p.add_argument("--gemm-square", type=nonneg_int, default=4096, metavar="N",
                   help="size of the square GEMM (0: none)")
    p.add_argument("--no-gemm-step-shapes", action="store_true",
                   help="skip the GEMM shapes taken from the traced GPT steps")
    p.add_argument("--gemm-ms", type=positive_float, default=60.0, metavar="MS",
                   help="GPU time per GEMM timing trial (3 trials, median)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="write JSON lines to FILE")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/bench.jsonl and DIR/bench.txt")


def _plan(args: argparse.Namespace) -> tuple[list[str], list[str], list[str], list[Any]]:
    """Sections, step precisions, GEMM dtypes and configs; a bad value is a usage error."""
    from benchmarks import configs, training

    sections = [args.only] if args.only else ([] if args.sweep else ["gemm", "step"])
    if args.sweep:
        sections.append("sweep")
    given = _names(args.precision) if args.precision else None
    for p in given or []:
        if p not in _GEMM_DTYPES:
            args.parser.error(f"--precision {p!r}: choose from {', '.join(_GEMM_DTYPES)}")
    step_prec = given or ["bf16"]
    gemm_dtypes = given or list(_GEMM_DTYPES)
    if any(s in sections for s in ("step", "sweep")):
        bad = [p for p in step_prec if p not in training.STEP_PRECISIONS]
        if bad:
            args.parser.error(f"--precision {','.join(bad)}: GPT steps run "
                              f"{' or '.join(training.STEP_PRECISIONS)} (f16 needs loss "
                              "scaling on both sides); use --only gemm for f16")
    try:
        cfgs = [configs.resolve(c, args.batch) for c in _names(args.configs)]
    except ValueError as e:
        args.parser.error(f"--configs: {e}")
    if not cfgs:
        args.parser.error("--configs: no config given")
    return sections, step_prec, gemm_dtypes, cfgs


def run(args: argparse.Namespace) -> int:
    """Run the benchmarks `args` asks for; returns the exit status."""
    sections, step_prec, gemm_dtypes, cfgs = _plan(args)
    from benchmarks import report as rp
    from benchmarks.environment import cold_inductor_cache, log, probe

    # before torch is imported: torch.compile's first compile in this process is a cold one
    note = None if args.no_torch else cold_inductor_cache()
    env = probe(want_torch=not args.no_torch, inductor_note=note)
    with contextlib.ExitStack() as stack:
        json_files: list[IO[str]] = []
        text_files: list[IO[str]] = []
        if args.json:
            json_files.append(stack.enter_context(_open(Path(args.json))))
        if args.out:
            out = Path(args.out)
            json_files.append(stack.enter_context(_open(out / "bench.jsonl")))
            text_files.append(stack.enter_context(_open(out / "bench.txt")))
        report = rp.Report(json_files, text_files, sys.stdout)
        options = {k: v for k, v in vars(args).items() if k not in ("func", "parser", "cmd")}
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        report.start({"options": options, "started": stamp, "device": env.alpha_device,
                      "device_type": env.alpha_device_type, "driver": env.alpha_driver,
                      "torch_version": env.torch_version, "torch_device": env.torch_device,
                      "why_no_torch": env.why_no_torch, "why_no_alpha": env.why_no_alpha,
                      "inductor_cache": env.inductor_cache})
        if env.alpha_device_type == "cpu" and any(bc.name != "tiny" for bc in cfgs):
            log(f"alpha_jit runs on a CPU device ({env.alpha_device}): small and gpt2 take "
                "minutes per step there; --configs tiny --gemm-square 256 is a quick look")
        report.text("\n".join([f"alpha-jit bench, {stamp}", *env.header()]))
        if "gemm" in sections:
            _gemm(args, env, cfgs, gemm_dtypes, report)
        if "step" in sections:
            _steps(args, env, cfgs, step_prec, report)
        if "sweep" in sections:
            _sweep(args, env, cfgs, step_prec, report)
        invalid = [r for r in report.rows if r.status == "INVALID"]
        log(f"done: {len(report.rows)} rows, {len(invalid)} INVALID")
        return 1 if invalid else 0


def _open(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", encoding="utf-8")


def _options(args: argparse.Namespace) -> Any:
    from benchmarks.gpt_step import StepOptions

    return StepOptions(steps=args.steps, warmup=args.warmup, parity_steps=args.parity_steps,
                       parity_tol=args.parity_tol, compile_time=not args.no_compile_time,
                       torch_compile=not args.no_torch_compile and not args.no_torch,
                       seed=args.seed)


def _gemm(args: argparse.Namespace, env: Any, cfgs: list[Any], dtypes: list[str],
          report: Any) -> None:
    from benchmarks import gemm
    from benchmarks.report import gemm_table

    configs = [] if args.no_gemm_step_shapes else cfgs
    cases = gemm.collect(configs, dtypes, args.gemm_square)
    rows = []
    for row in gemm.bench(cases, env, seed=args.seed, target_ms=args.gemm_ms):
        report.add(row)
        rows.append(row)
    report.text("\nGEMM: alpha_jit kernel vs torch.matmul (ratio = alpha / torch throughput)\n"
                + gemm_table(rows, _known(env)))
    _release_alpha_device()


def _steps(args: argparse.Namespace, env: Any, cfgs: list[Any], precisions: list[str],
           report: Any) -> None:
    from benchmarks.gpt_step import bench_config
    from benchmarks.report import step_table

    opts = _options(args)
    rows = []
    for bc in cfgs:
        for precision in precisions:
            for row in bench_config(bc, precision, env, opts):
                report.add(row)
                rows.append(row)
    report.text("\nGPT training step (AdamW, clip 1.0; vs = their ms / this row's ms)\n"
                + step_table(rows, _known(env)))


def _sweep(args: argparse.Namespace, env: Any, cfgs: list[Any], precisions: list[str],
           report: Any) -> None:
    from benchmarks.report import step_table
    from benchmarks.sweep import sweep_batch

    rows = []
    for row in sweep_batch(cfgs, precisions, env, _options(args), args.sweep_max):
        report.add(row)
        rows.append(row)
    report.text("\nBatch sweep (each side until it fails)\n" + step_table(rows, _known(env)))


def _known(env: Any) -> list[str]:
    """Reasons the header gives already: the tables do not repeat them."""
    return [w for w in (env.why_no_torch, env.why_no_alpha) if w]


def _release_alpha_device() -> None:
    """Close alpha_jit's device so its memory is free for the next section's sides."""
    from alpha_jit.runtime.device import reset_device

    reset_device()
