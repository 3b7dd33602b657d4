"""Rows of `alpha-jit bench` and how they are shown: a table for people, JSON lines for machines.

Why one file: the row types are the benchmark's output contract. Each is a frozen dataclass whose
fields are exactly the JSON keys (documented in `GEMM_KEYS`, `STEP_KEYS`, `RUN_KEYS`); every
empty (None) measurement has its reason in `why_empty` under the column's key, and a row whose
answer was wrong or not comparable has `valid: false` and is shown as INVALID, never as a speed.
A JSON file gets one object per line, written as each row is measured (a run cut short keeps
what it measured): first a `run` object, then `gemm`, `step` and `sweep` rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

RUN_KEYS = {
    "kind": "'run': the first line, once per run",
    "options": "the options `alpha-jit bench` ran with ({option: value})",
    "started": "local date and time the run started (ISO 8601)",
    "device": "alpha_jit's Vulkan device name (null: none)",
    "device_type": "its Vulkan device type",
    "driver": "its driver",
    "torch_version": "PyTorch version (null: not installed)",
    "torch_device": "torch.cuda device name (null: no CUDA)",
    "why_no_torch": "why the torch columns are empty (null: they are measured)",
    "why_no_alpha": "why the alpha_jit columns are empty (null: they are measured)",
    "inductor_cache": "where torch.compile caches, and whether its compile time is cold",
}

COMMON_KEYS = {
    "kind": "'gemm', 'step' or 'sweep'",
    "valid": "false: the result was wrong, disagreed with PyTorch, or the row did not run",
    "status": "'ok', 'INVALID', 'does not run', 'unchecked' (ran; no reference to check it)",
    "error": "why the row did not run or is invalid (null otherwise)",
    "why_empty": "{column key: why that column is null}",
    "notes": "other remarks (list of strings)",
    "device": "alpha_jit's Vulkan device name",
    "torch_version": "PyTorch version (null: not installed)",
    "torch_device": "torch.cuda device name (null: no CUDA)",
}

GEMM_KEYS = {
    **COMMON_KEYS,
    "dtype": "operand type (bf16, f16, f32); accumulation is f32",
    "out_dtype": "alpha_jit's output type for this GEMM",
    "batch": "batch count B", "m": "rows M", "n": "columns N", "k": "reduction length K",
    "layout": "operand layouts: A and B, each row-major (N), column-major (T), or strided",
    "uses": "where the shape comes from: 'square 4096^3', or '<config> <prec> step xC'",
    "flops": "2*B*M*N*K",
    "alpha_ms": "alpha_jit kernel GPU time per GEMM (median of trials, timestamps), ms",
    "alpha_tflops": "flops / alpha_ms", "torch_ms": "torch.matmul time (CUDA events), ms",
    "torch_tflops": "flops / torch_ms",
    "ratio": "alpha_tflops / torch_tflops (1.0: as fast as cuBLAS)",
    "check_rel_err": "relative L2 error of alpha_jit's output against a float64 numpy GEMM",
    "check_tol": "its tolerance: f32 accumulation over K plus one rounding of the output",
    "torch_out_dtype": "the output type torch wrote",
    "variant": "alpha_jit's kernel variant and tiling (the step's: autotuned on this device)",
}

STEP_KEYS = {
    **COMMON_KEYS,
    "side": "'alpha_jit', 'torch_eager' or 'torch_compile'",
    "config": "model config name (tiny, small, gpt2)",
    "precision": "bf16 (autocast: bf16 GEMM inputs, f32 master weights) or f32",
    "batch": "sequences per step", "seq": "tokens per sequence",
    "params": "parameters (tied head counted once)",
    "tokens_per_step": "batch * seq", "flops_per_step": "model FLOPs (see benchmarks/configs.py)",
    "ms_per_step": "median wall time of a synced step after warm-up, ms",
    "steps_timed": "steps in that median",
    "tokens_per_s": "tokens_per_step / ms_per_step",
    "mfu": "flops_per_step / step time / spec-sheet peak (fraction)",
    "peak_tflops": "the peak used (benchmarks/peaks.py)",
    "mem_planned_bytes": "alpha_jit: device memory the step's plan asks for",
    "mem_allocated_bytes": "alpha_jit: device memory actually allocated (Vulkan blocks)",
    "mem_peak_bytes": "PyTorch: torch.cuda.max_memory_allocated()",
    "first_call_s": "in this process: first call to first loss read (includes compiling)",
    "compile_cold_s": "fresh process, empty caches: first call to first loss read, s",
    "compile_warm_s": "a second process with the first one's disk caches, s",
    "host_overhead_ms": "GPU idle, then the call until it returns (after submitting), ms",
    "loss_first": "loss of the first step", "loss_last": "loss of the last parity step",
    "parity_checked": "whether losses were compared with PyTorch eager",
    "parity_max_rel": "max relative loss difference over the parity steps",
    "parity_tol": "its tolerance", "parity_steps": "steps compared",
    "parity_reference": "what the losses were compared with (side and torch device)",
    "vs_torch_eager": "torch eager ms / this row's ms (>1: faster than eager)",
    "vs_torch_compile": "torch.compile ms / this row's ms",
}


@dataclass(frozen=True)
class RowBase:
    valid: bool
    status: str
    error: str | None
    why_empty: dict[str, str]
    notes: tuple[str, ...]
    device: str | None
    torch_version: str | None
    torch_device: str | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}  # type: ignore[attr-defined]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class GemmRow(RowBase):
    dtype: str = ""
    out_dtype: str = ""
    batch: int = 1
    m: int = 0
    n: int = 0
    k: int = 0
    layout: str = ""
    uses: tuple[str, ...] = ()
    flops: int = 0
    alpha_ms: float | None = None
    alpha_tflops: float | None = None
    torch_ms: float | None = None
    torch_tflops: float | None = None
    ratio: float | None = None
    check_rel_err: float | None = None
    check_tol: float | None = None
    torch_out_dtype: str | None = None
    variant: str | None = None
    kind: str = "gemm"


@dataclass(frozen=True)
class StepRow(RowBase):
    side: str = ""
    config: str = ""
    precision: str = ""
    batch: int = 0
    seq: int = 0
    params: int = 0
    tokens_per_step: int = 0
    flops_per_step: int = 0
    ms_per_step: float | None = None
    steps_timed: int = 0
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_tflops: float | None = None
    mem_planned_bytes: int | None = None
    mem_allocated_bytes: int | None = None
    mem_peak_bytes: int | None = None
    first_call_s: float | None = None
    compile_cold_s: float | None = None
    compile_warm_s: float | None = None
    host_overhead_ms: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    parity_checked: bool = False
    parity_max_rel: float | None = None
    parity_tol: float | None = None
    parity_steps: int = 0
    parity_reference: str | None = None
    vs_torch_eager: float | None = None
    vs_torch_compile: float | None = None
    kind: str = "step"  # or "sweep"


# ---- the table ----------------------------------------------------------------------------------
def _num(v: float | None, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def _gib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**30:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first columns, right-aligned numbers, one space-padded line per row."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _status(row: RowBase, notes: list[str]) -> str:
    """The status cell; anything worth a sentence becomes a numbered footnote."""
    if row.status == "ok" and not row.error and not row.notes:
        return "ok"
    notes.append(row.error or "; ".join(row.notes) or row.status)
    return f"{row.status} [{len(notes)}]"


# reasons the table's layout already makes plain: not repeated under it (the JSON has them)
_SELF_EVIDENT = ("this row is ", "this is the reference", "alpha_jit only", "PyTorch only",
                 "eager PyTorch compiles nothing")


def _empties(rows: Sequence[RowBase], known: Sequence[str]) -> list[str]:
    """Each distinct reason for an empty column, once, with the columns it applies to; reasons
    that contain a `known` one (said in the header) or are self-evident are left out."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        for col, why in r.why_empty.items():
            if why.startswith(_SELF_EVIDENT) or any(k and k in why for k in known):
                continue
            cols = by_reason.setdefault(why, [])
            if col not in cols:
                cols.append(col)
    return [f"  {', '.join(cols)}: {why}" for why, cols in by_reason.items()]


def gemm_table(rows: Sequence[GemmRow], known: Sequence[str] = ()) -> str:
    notes: list[str] = []
    body = []
    for r in rows:
        check = "-" if r.check_rel_err is None else f"{r.check_rel_err:.1e}"
        out = r.out_dtype if r.torch_out_dtype in (None, r.out_dtype) else \
            f"{r.out_dtype} (torch {r.torch_out_dtype})"
        body.append([r.dtype, out, f"{r.batch}x{r.m}x{r.n}x{r.k}", r.layout,
                     ",".join(r.uses)[:40], _num(r.alpha_ms, ".3f"), _num(r.alpha_tflops, ".2f"),
                     _num(r.torch_ms, ".3f"), _num(r.torch_tflops, ".2f"),
                     _num(r.ratio, ".3f"), check, " ".join((r.variant or "-").split()[:2]),
                     _status(r, notes)])
    text = table(["dtype", "out", "BxMxNxK", "layout", "uses", "alpha ms", "alpha TF/s",
                  "torch ms", "torch TF/s", "ratio", "rel err", "variant", "status"], body)
    return _with_notes(text, notes, rows, known)


def step_table(rows: Sequence[StepRow], known: Sequence[str] = ()) -> str:
    notes: list[str] = []
    body = []
    for r in rows:
        mem = (f"{_gib(r.mem_planned_bytes)}/{_gib(r.mem_allocated_bytes)}"
               if r.side == "alpha_jit" else _gib(r.mem_peak_bytes))
        comp = f"{_num(r.compile_cold_s, '.1f')}/{_num(r.compile_warm_s, '.1f')}"
        parity = "-" if r.parity_max_rel is None else f"{r.parity_max_rel:.1e}"
        body.append([r.config, str(r.batch), r.precision, r.side, _num(r.ms_per_step, ".2f"),
                     _num(r.tokens_per_s, ",.0f"), _num(None if r.mfu is None else 100 * r.mfu,
                                                        ".1f"),
                     mem, comp, _num(r.first_call_s, ".1f"), _num(r.host_overhead_ms, ".3f"),
                     _num(r.vs_torch_eager, ".3f"), _num(r.vs_torch_compile, ".3f"), parity,
                     _status(r, notes)])
    text = table(["config", "B", "prec", "side", "ms/step", "tok/s", "MFU %",
                  "mem GiB (alpha: plan/alloc)", "compile s cold/warm", "1st call s",
                  "host ms", "vs eager", "vs compile", "loss rel", "status"], body)
    return _with_notes(text, notes, rows, known)


def _with_notes(text: str, notes: list[str], rows: Sequence[RowBase],
                known: Sequence[str]) -> str:
    parts = [text]
    if notes:
        parts.append("\n".join(f"  [{i}] {n}" for i, n in enumerate(notes, 1)))
    empties = _empties(rows, known)
    if empties:
        parts.append("empty columns:\n" + "\n".join(empties))
    return "\n".join(parts)


# ---- the writer ---------------------------------------------------------------------------------
class Report:
    """Collects rows; writes each to the JSON files as it comes and the tables at the end."""

    def __init__(self, json_files: Sequence[IO[str]], text_files: Sequence[IO[str]],
                 out: IO[str]):
        self.json_files, self.text_files, self.out = list(json_files), list(text_files), out
        self.rows: list[RowBase] = []

    def _json(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, allow_nan=False, default=str)
        for f in self.json_files:
            f.write(line + "\n")
            f.flush()  # a run cut short keeps every row measured so far

    def start(self, run: dict[str, Any]) -> None:
        self._json({"kind": "run", **run})

    def add(self, row: RowBase) -> None:
        self.rows.append(row)
        self._json(_finite(row.to_json()))

    def text(self, block: str) -> None:
        self.out.write(block + "\n")
        self.out.flush()
        for f in self.text_files:
            f.write(block + "\n")
            f.flush()


def _finite(obj: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: such a number becomes null (its row is invalid already)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in obj.items()}
