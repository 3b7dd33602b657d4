"""What this machine offers the benchmark, and the small measuring helpers every part shares.

Why: `alpha-jit bench` must run wherever alpha_jit runs. PyTorch is optional (imported only
here, only if installed), CUDA may be absent, and every column that stays empty must say why.
`probe()` answers once per run: alpha_jit's Vulkan device, torch's version and CUDA device, and
the reason the torch-side timings are empty when they are. Progress goes to stderr (`log`);
stdout is the report's.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_T0 = time.perf_counter()


def log(message: str) -> None:
    """One progress line on stderr, stamped with the seconds since the bench started."""
    print(f"[bench {time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def short_error(exc: BaseException, limit: int = 400) -> str:
    """`Type: first lines of the message`, short enough for a table cell and a JSON field."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def import_torch() -> Any:
    """The torch module, or None when it is not installed (or fails to import)."""
    try:
        import torch
    except Exception:  # an absent or broken install: the alpha_jit side runs alone
        return None
    return torch


@dataclass(frozen=True)
class Environment:
    """The two sides' devices and versions, and why a side cannot be timed (None: it can)."""

    alpha_device: str | None  # alpha_jit's Vulkan device name
    alpha_device_type: str | None  # 'discrete' | 'integrated' | 'cpu' | ...
    alpha_driver: str | None
    why_no_alpha: str | None
    torch_version: str | None  # None: torch is not installed
    torch_device: str | None  # torch.cuda.get_device_name(), None without CUDA
    why_no_torch: str | None  # why torch-side timings are empty
    inductor_cache: str | None  # note on where torch.compile caches (cold or not)

    @property
    def torch_timed(self) -> bool:
        return self.why_no_torch is None

    def header(self) -> list[str]:
        """Lines for the top of the report."""
        lines = [f"alpha_jit device: {self.alpha_device or '-'}"
                 + (f" ({self.alpha_device_type}, driver {self.alpha_driver})"
                    if self.alpha_device else f"  [{self.why_no_alpha}]")]
        torch_line = f"torch: {self.torch_version or '-'}"
        if self.torch_device:
            torch_line += f" on {self.torch_device}"
        lines.append(torch_line)
        if self.why_no_torch:
            lines.append(f"torch columns are empty: {self.why_no_torch}")
        if self.inductor_cache:
            lines.append(f"torch.compile: {self.inductor_cache}")
        return lines

    def json_fields(self) -> dict[str, Any]:
        """The keys every JSON row carries about where it was measured."""
        return {"device": self.alpha_device, "torch_version": self.torch_version,
                "torch_device": self.torch_device}


def cold_inductor_cache() -> str:
    """Point torch.compile's caches (inductor, triton) at a fresh folder unless the user chose
    one, so its first compile in this process is a cold one; returns a note saying which.
    Must run before torch compiles anything (the variables are read when a cache is used)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return (f"inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']} (set by the user: "
                "its compile time may be warm)")
    root = tempfile.mkdtemp(prefix="alpha_jit_bench_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(root, "triton"))
    return f"fresh inductor/triton caches under {root} (its compile time is a cold one)"


def probe(want_torch: bool = True, inductor_note: str | None = None) -> Environment:
    """Look at both sides once: create alpha_jit's device, import torch, ask for CUDA.
    `inductor_note`: what `cold_inductor_cache()` said, if the caller ran it."""
    alpha_name = alpha_type = alpha_driver = why_alpha = None
    try:
        from alpha_jit.runtime.device import get_device

        caps = get_device().caps
        alpha_name, alpha_type, alpha_driver = caps.name, caps.device_type, caps.driver_name
    except Exception as e:  # no loader, no device: every alpha_jit row will say so
        why_alpha = f"alpha_jit has no Vulkan device: {short_error(e)}"
    torch_version = torch_device = why_torch = inductor = None
    if not want_torch:
        why_torch = "the torch side was not requested"
    else:
        torch = import_torch()
        if torch is None:
            why_torch = "PyTorch is not installed (pip install torch to compare)"
        else:
            inductor = inductor_note
            torch_version = str(torch.__version__)
            if torch.cuda.is_available():
                torch_device = torch.cuda.get_device_name(0)
            else:
                why_torch = (f"no CUDA device (torch {torch_version}: torch.cuda.is_available() "
                             "is False); timings against PyTorch need an NVIDIA GPU")
    return Environment(alpha_name, alpha_type, alpha_driver, why_alpha, torch_version,
                       torch_device, why_torch, inductor)
