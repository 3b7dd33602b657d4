"""Everything about a compiled step that is decided before a device is touched.

`plan_step(graph, caps)` lowers the graph, generates every kernel for the capabilities, plans
the arena and the barriers, and lays out every device allocation the step will ask for. It
reads only the typed `Capabilities`, never a live device, so the same plan is what `Executable`
builds from, what `alpha-jit dump-ir --json --plan-only --device-caps FILE` prints for a GPU on
another machine, and what the profiler joins its timestamps with: per kernel its variant, grid,
the bytes and FLOPs it moves, and the provenance of every graph node fused into it.
A plan that cannot fit the device (an allocation over maxMemoryAllocationSize, a binding over
maxStorageBufferRange) is known here, before any pipeline is compiled.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from alpha_jit.codegen_spirv.generate import generate
from alpha_jit.codegen_spirv.kernel import KernelBinary
from alpha_jit.codegen_spirv.lower import Lowered, LoweredKernel, lower
from alpha_jit.errors import AlphaJitError
from alpha_jit.ir.graph import Graph
from alpha_jit.ir.host_gc import gc_paused
from alpha_jit.runtime import autotune
from alpha_jit.runtime.caps import Capabilities
from alpha_jit.runtime.plan import MemoryPlan, plan_barriers, plan_memory
from alpha_jit.schedule import horizontal

log = logging.getLogger("alpha_jit.plan")

_ALIGN = 256  # every region starts on this (descriptor offsets on any driver)
_STAGE_ALIGN = 16  # inputs and outputs in the staging/readback regions
# staging/readback slots a step alternates between: a call writes its inputs while the
# previous step still runs, and reading a loss never holds up the next submit
STAGING_RING = 2


class MemoryPlanError(AlphaJitError):
    """The step's memory plan does not fit the device; the message says which allocation or
    binding is over which limit, and how big the step's peak is."""


@dataclass(frozen=True)
class KernelInfo:
    """One kernel of the plan as tools show it: what runs, how big, and where it came from."""

    id: int
    family: str
    name: str
    variant: str  # the generator's choice for this device, e.g. "simt 128x128x8 micro 8x8"
    grid: tuple[tuple[int, int, int], ...]  # workgroup counts of each dispatch
    local_size: tuple[int, int, int]
    bytes: int  # compulsory traffic: every bound buffer read or written once
    flops: int  # arithmetic, from the spec (2mnk for a GEMM, one per element and op otherwise)
    module: str  # module paths of the fused nodes, joined by ", "
    phase: str  # fwd | bwd | opt, or several joined by "+"
    # file:line of every fused graph node, first appearance first, with the alpha_jit layer line
    # behind it where there is one: "train_gpt.py:88 (transformer.py:118)"
    sources: tuple[str, ...]
    passes: tuple[str, ...]  # what created the nodes ("trace", "autodiff", a pass name)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "name": self.name,
                "variant": self.variant, "grid": [list(g) for g in self.grid],
                "local_size": list(self.local_size), "bytes": self.bytes, "flops": self.flops,
                "module": self.module, "phase": self.phase, "sources": list(self.sources),
                "passes": list(self.passes)}


@dataclass(frozen=True)
class Allocation:
    """One region the step asks the device for."""

    what: str  # "arena", "state <name>", "input 0", "hparam <name>", "staging 0", "readback 1"
    bytes: int
    heap: str  # device | staging


@dataclass
class StepPlan:
    caps: Capabilities
    lowered: Lowered
    binaries: list[KernelBinary]
    memory: MemoryPlan
    barriers: list[bool]
    kernels: list[KernelInfo]
    allocations: list[Allocation]
    staged: list[tuple[int, int]]  # (input/hparam buffer id, byte offset in staging)
    stage_bytes: int
    out_offsets: list[int]  # byte offset of each output in the readback region
    out_bytes: int
    problems: list[str] = field(default_factory=list)  # why it cannot run on caps, if so
    recompute: str = ""  # what memory_budget made the plan recompute in backward, if anything
    tune_s: float = 0.0  # of the planning time: GEMM tiling choices (timed on a cold cache)
    generate_s: float = 0.0  # of the planning time: SPIR-V generation (or disk-cache reads)

    @property
    def peak_bytes(self) -> int:
        """Device memory the step holds at once: every allocation lives for the whole step."""
        return sum(a.bytes for a in self.allocations)

    def check_fits(self) -> None:
        """Raise MemoryPlanError (before any pipeline is built) if the plan cannot run."""
        if self.problems:
            raise MemoryPlanError(
                f"the step cannot run on {self.caps.name}: " + "; ".join(self.problems)
                + f" (peak {_gib(self.peak_bytes)} in {len(self.allocations)} allocations; "
                "`alpha-jit dump-ir --plan-only` shows the plan)")

    def to_json(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes,
                "allocations": [a.bytes for a in self.allocations],
                "regions": [{"what": a.what, "bytes": a.bytes, "heap": a.heap}
                            for a in self.allocations],
                "arena_bytes": self.memory.arena_bytes,
                "pools": list(self.memory.pool_bytes),
                "arena_without_reuse_bytes": self.memory.naive_bytes,
                "max_allocation_bytes": self.caps.max_memory_allocation_size,
                "max_binding_bytes": self.caps.max_storage_buffer_range,
                "barriers": sum(self.barriers), "fits": not self.problems,
                "problems": list(self.problems), "recompute": self.recompute}


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _round_up(x: int, a: int) -> int:
    return -(-x // a) * a


BARRIER_POLICIES = ("hazard", "all")


def barrier_policy() -> str:
    """`ALPHA_JIT_BARRIERS`: "hazard" (default: a barrier only where kernels share bytes) or
    "all" (a barrier before every kernel)."""
    policy = os.environ.get("ALPHA_JIT_BARRIERS", "hazard").strip() or "hazard"
    if policy not in BARRIER_POLICIES:
        raise AlphaJitError(f"ALPHA_JIT_BARRIERS={policy!r}: choose one of {BARRIER_POLICIES}")
    return policy


def plan_step(graph: Graph, caps: Capabilities, state_names: dict[object, str] | None = None,
              progress: bool = True, memory_budget: int | None = None,
              device: Any = None) -> StepPlan:
    """Lower, generate and plan `graph` for a device described by `caps` (no device needed).
    `state_names`: state key -> the parameter's name, for the allocation list.
    `memory_budget` (bytes): over it, norms and GELU are recomputed in backward
    (`ir/passes/recompute.py`) and the step planned again; still over, the plan has a problem
    (`check_fits` raises). `device`: a live device on which GEMM shapes not tuned yet are
    measured (`autotune.py`); without one, tuned choices come from the disk cache only."""
    with gc_paused():  # planning keeps what it allocates: collections find nothing
        plan = _plan(graph, caps, state_names, progress, device)
        if memory_budget is None or plan.peak_bytes <= memory_budget:
            return plan
        from alpha_jit.ir.passes.recompute import PASS_NAME, recompute_in_backward

        rewritten, summary = recompute_in_backward(graph)
        log.info("%s: planned peak %s over memory_budget %s: %s", PASS_NAME,
                 _gib(plan.peak_bytes), _gib(memory_budget), summary)
        first = plan
        plan = _plan(rewritten, caps, state_names, progress, device)
        plan.tune_s += first.tune_s  # the build's tuning and generation, both plans'
        plan.generate_s += first.generate_s
    plan.recompute = summary
    if plan.peak_bytes > memory_budget:
        plan.problems.append(f"the planned peak {_gib(plan.peak_bytes)} exceeds memory_budget "
                             f"{_gib(memory_budget)} even with norm and GELU outputs "
                             "recomputed in backward (a smaller batch fits less)")
    return plan


def _plan(graph: Graph, caps: Capabilities, state_names: dict[object, str] | None,
          progress: bool, device: Any = None) -> StepPlan:
    lowered = lower(graph, min(caps.max_storage_buffers_per_stage, 64), caps)
    if horizontal.enabled():  # one multi-tensor kernel per group of same-expression kernels
        horizontal.fuse_horizontally(lowered, min(caps.max_storage_buffers_per_stage, 512))
    kernels = lowered.kernels
    early: dict[int, KernelBinary] = {}
    spent = [0.0]

    def others() -> None:
        """What tuning cannot change, generated while the tuner's candidates compile; with a
        device their driver compiles queue behind the candidates' and run while the tuner
        times (a cold build's two slow phases overlap)."""
        t = time.perf_counter()
        early.update({i: generate(k.spec, caps) for i, k in enumerate(tqdm(
            kernels, desc="alpha_jit: generating kernels", unit="kernel",
            disable=not progress or len(kernels) < 64, leave=False))
            if not autotune.tunable(k)})
        if device is not None:
            device.pipelines.prefetch(list(early.values()))
        spent[0] = time.perf_counter() - t

    t1 = time.perf_counter()
    # every GEMM's tiling, explicit in its spec (split-K workspaces join the buffers)
    autotune.resolve(kernels, caps, device, lowered.buffers, on_compiling=others)
    t2 = time.perf_counter()
    binaries = [early[i] if i in early else generate(k.spec, caps)
                for i, k in enumerate(kernels)]
    t3 = time.perf_counter()
    align = max(_ALIGN, caps.min_storage_buffer_offset_alignment)
    # a pool per device allocation, each within the device's limits (and a binding's range)
    limit = min(caps.max_memory_allocation_size, 1 << 40) // align * align
    mem = plan_memory(lowered, align, limit)
    barriers = plan_barriers(lowered, mem, barrier_policy())
    plan = StepPlan(caps, lowered, binaries, mem, barriers,
                    [_kernel_info(i, k, b, lowered) for i, (k, b) in
                     enumerate(zip(kernels, binaries, strict=True))], [], [], 0, [], 0)
    _layout(plan, graph, state_names or {})
    plan.problems = _problems(plan)
    plan.tune_s, plan.generate_s = t2 - t1 - spent[0], spent[0] + (t3 - t2)
    return plan


def _layout(plan: StepPlan, graph: Graph, names: dict[object, str]) -> None:
    """The allocations, in the order Executable makes them, and the staging/readback layout."""
    low = plan.lowered
    allocs = plan.allocations
    pools = plan.memory.pool_bytes
    for i, nbytes in enumerate(pools):
        allocs.append(Allocation("arena" if len(pools) == 1 else f"arena pool {i}", nbytes,
                                 "device"))
    states: dict[object, int] = {}
    for b in low.buffers.values():
        if b.kind == "state":
            states.setdefault(b.key, b.nbytes)
        elif b.kind in ("input", "hparam"):
            label = b.key[1] if b.kind == "hparam" else f"argument {b.key}"  # key: (owner, name)
            allocs.append(Allocation(f"{b.kind} {label}", b.nbytes, "device"))
            plan.staged.append((b.id, plan.stage_bytes))
            plan.stage_bytes += _round_up(b.nbytes, _STAGE_ALIGN)
    for key, n in graph.state_writes.items():
        if key not in states:  # written but never read (a fresh .grad): still resident
            states[key] = max(int(np.prod(graph.shape(n), dtype=np.int64)), 1) \
                * graph.dtype(n).itemsize
    for key, nbytes in states.items():
        allocs.append(Allocation(f"state {names.get(key, key)}", nbytes, "device"))
    for slot in range(STAGING_RING):
        allocs.append(Allocation(f"staging {slot}", max(plan.stage_bytes, 16), "staging"))
    for b in low.outputs:
        plan.out_offsets.append(plan.out_bytes)
        plan.out_bytes += _round_up(low.buffers[b].nbytes, _STAGE_ALIGN)
    for slot in range(STAGING_RING):
        allocs.append(Allocation(f"readback {slot}", max(plan.out_bytes, 16), "staging"))


def _problems(plan: StepPlan) -> list[str]:
    caps, low = plan.caps, plan.lowered
    out = []
    for a in plan.allocations:
        if _round_up(a.bytes, _ALIGN) > caps.max_memory_allocation_size:
            what = a.what
            if a.what.startswith("arena"):
                big = max((b for b in low.buffers.values() if b.kind == "temp"),
                          key=lambda b: b.nbytes)
                what += (f" (the largest temporary is %{big.id} {big.dtype}{list(big.shape)}, "
                         f"{_gib(big.nbytes)})")
            out.append(f"{what} needs one allocation of {a.bytes} bytes ({_gib(a.bytes)}), over "
                       f"maxMemoryAllocationSize={caps.max_memory_allocation_size} "
                       f"({_gib(caps.max_memory_allocation_size)})")
    for k, info, b in zip(low.kernels, plan.kernels, plan.binaries, strict=True):
        if "problem" in b.notes:  # a kernel the device cannot run correctly
            src = info.sources[0] if info.sources else "?"
            out.append(f"kernel {info.id} ({info.name}, {src}): {b.notes['problem']}")
        for bid in [*k.reads, *k.writes]:
            nbytes = low.buffers[bid].nbytes
            if nbytes > caps.max_storage_buffer_range:
                src = info.sources[0] if info.sources else "?"
                out.append(f"kernel {info.id} ({info.name}, {src}) binds %{bid} of {nbytes} "
                           f"bytes, over maxStorageBufferRange={caps.max_storage_buffer_range}")
                break
    return out


# ---- per-kernel facts ------------------------------------------------------------------------
def _kernel_info(i: int, k: LoweredKernel, binary: KernelBinary, low: Lowered) -> KernelInfo:
    g = low.graph
    provs = [g.prov(n) for n in k.nodes if n in g.g] or [k.prov]
    sources = tuple(dict.fromkeys(p.source() for p in provs))
    modules = [m for m in dict.fromkeys(p.module for p in provs) if m]
    phases = "+".join(dict.fromkeys(p.phase for p in provs))
    passes = tuple(dict.fromkeys([*(p.created_by for p in provs), *k.fused_by]))
    nbytes = sum(low.buffers[b].nbytes for b in dict.fromkeys([*k.reads, *k.writes]))
    return KernelInfo(i, k.spec.family, k.spec.name, binary.variant,
                      tuple(tuple(d.groups) for d in binary.dispatches), binary.local_size,
                      # the generator's own count where it gives one (attention, GEMM)
                      nbytes, int(binary.notes.get("flops") or kernel_flops(k, low)),
                      ", ".join(modules), phases, sources, passes)


_REDUCE_FLOPS = {"sum": 1, "mean": 1, "max": 1, "lse": 4}  # lse: max, sub, exp, add


def kernel_flops(k: LoweredKernel, low: Lowered) -> int:
    """Arithmetic operations of one kernel, from its spec: 2*b*m*n*k for a GEMM; one per output
    element and expression for elementwise; per input element for a reduction (lse counts 4);
    one per added element for a scatter; none for copies and gathers."""
    p = dict(k.spec.params)
    fam = k.spec.family
    if fam == "matmul":
        return 2 * p["batch"] * p["m"] * p["n"] * p["k"]
    if fam in ("elementwise", "elementwise_multi"):
        shapes = [p["shape"]] if fam == "elementwise" else [s[0] for s in p["segments"]]
        numel = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes)
        return numel * sum(1 for op, *_ in p["exprs"] if op != "copy")
    if fam == "reduction":
        rows = int(np.prod(p["outer_shape"], dtype=np.int64))
        return rows * p["red_len"] * _REDUCE_FLOPS.get(p["mode"], 1)
    if fam == "scatter":
        return p["n"] * p["dim"]
    return 0


# ---- SPIR-V validation (plan-only) -----------------------------------------------------------
def validate_spirv(plan: StepPlan) -> int:
    """spirv-val every distinct module of the plan for its device's target environment, a few
    at a time; raises SpirvToolError naming the first bad kernel. Returns how many were checked.
    """
    from alpha_jit.codegen_spirv import tools

    env = plan.caps.spirv_target_env()
    distinct = {b.words: b.name for b in plan.binaries}
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # spirv-val is a subprocess
        for f in tqdm(concurrent.futures.as_completed(
                [pool.submit(tools.validate, w, name, env) for w, name in distinct.items()]),
                total=len(distinct), desc="alpha_jit: spirv-val", unit="module",
                disable=len(distinct) < 64, leave=False):
            f.result()
    return len(distinct)
