"""`--sweep batch`: each side's throughput and memory at batch 1, 2, 4, ... until it fails.

Why: the first question of training performance is occupancy. A GPU reaches its throughput
only with enough work per step, and memory decides how much fits: this sweep shows, per side,
where tokens/s stops growing and where memory runs out (alpha_jit: an allocation over the
device's limits or out of device memory; PyTorch: CUDA out of memory). Each size is measured
like a step row (benchmarks/gpt_step.py: median of synced steps after warm-up, memory as
planned/allocated or max_memory_allocated) and is a `sweep` row; the first size that fails is
a "does not run" row with the error, and ends that side's sweep. Loss parity is the step rows'
business: sweep rows are not compared (status "unchecked" for alpha_jit). PyTorch is swept in
eager mode only (torch.compile would recompile for every size), and only on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from benchmarks import training
from benchmarks.configs import BenchConfig, step_flops
from benchmarks.environment import Environment, log
from benchmarks.gpt_step import (
    ALPHA,
    EAGER,
    SideRun,
    StepOptions,
    measure_alpha,
    measure_torch,
    side_row,
    unchecked,
)
from benchmarks.report import StepRow


def batch_sizes(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit`."""
    sizes, b = [], 1
    while b <= limit:
        sizes.append(b)
        b *= 2
    return sizes


def sweep_batch(configs: Sequence[BenchConfig], precisions: Sequence[str], env: Environment,
                opts: StepOptions, max_batch: int) -> Iterable[StepRow]:
    """Yield one `sweep` row per (config, precision, side, batch size) measured."""
    why = "the batch sweep does not compare losses (the step rows do)"
    for base in configs:
        for precision in precisions:
            init = None
            sides = [ALPHA] + ([EAGER] if env.torch_timed else [])
            for side in sides:
                for b in batch_sizes(max_batch):
                    bc = replace(base, batch=b)
                    log(f"sweep {bc.label} {precision}: {side}")
                    if side == ALPHA:
                        run = _alpha(bc, precision, env, opts)
                    else:
                        if init is None:  # the weights do not matter here; the shapes do
                            init = training.weights(training.alpha_model(base, opts.seed))
                        run = measure_torch(bc, precision, init, training.batch(bc, opts.seed),
                                            "cuda", False, 1, opts.warmup, opts.steps, 0)
                    speeds = {side: run.ms} if run.ms is not None and not run.error else {}
                    verdict = unchecked(why, opts.parity_tol) if side == ALPHA else None
                    yield side_row(bc, precision, env, run, verdict, speeds,
                                   step_flops(bc.model, bc.batch, bc.seq), None, "sweep")
                    if run.error:
                        break


def _alpha(bc: BenchConfig, precision: str, env: Environment, opts: StepOptions) -> SideRun:
    if env.why_no_alpha:
        return SideRun(ALPHA, error=env.why_no_alpha)
    model = training.alpha_model(bc, opts.seed)  # fresh: the last one's device is gone
    run = measure_alpha(model, precision, training.batch(bc, opts.seed), 1, opts.warmup,
                        opts.steps, 0)
    return replace(run, device=env.alpha_device)
