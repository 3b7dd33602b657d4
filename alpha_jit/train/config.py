"""The trainer's configuration and the checks every number in it must pass, before any work.

`TrainConfig` is what `train()` takes and `examples/train_gpt.py` fills from its flags. A bad
value (a NaN learning rate, zero steps, a negative weight decay) must fail at once with a
message naming the option, not hours later as a checkpoint full of NaN: `validate` checks a
config object, and the argparse types below (`positive_float`, `nonneg_int`, ...) reject the
same values on the command line, so `--lr nan` is a usage error (exit 2) like a typo.

`is_user_error` draws the line the command-line tools share: bad input (a missing path, a
corrupt checkpoint, a config mismatch) is reported as `prog: error: <message>` with exit
status 2; anything else (an internal bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alpha_jit.errors import AlphaJitError, DeviceNotFoundError, NoVulkanLoaderError

PRECISIONS = ("f32", "f16", "bf16")


class TrainConfigError(AlphaJitError, ValueError):
    """A training option that cannot work (zero steps, a non-finite learning rate, ...)."""


@dataclass
class TrainConfig:
    data: str | None = None  # text file, folder or .bin of uint16 tokens; None: Python stdlib
    out_dir: str = "runs/gpt"
    steps: int = 300
    batch_size: int = 8
    precision: str = "f32"
    lr: float = 3e-3
    min_lr: float | None = None  # None: lr / 10, so lowering --lr alone never makes it rise
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 0  # 0: only at the end
    seed: int = 1337
    resume: bool = False
    stop_at: int | None = None  # end this run early (a checkpoint is written), as a preemption
    max_bytes: int = 4 * 2**20  # corpus cap (bytes of text) so tokenizing stays quick
    progress: bool = True
    handle_signals: bool = True  # SIGINT/SIGTERM: checkpoint at the step boundary, then stop
    model: dict = field(default_factory=lambda: dict(
        vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0))

    @property
    def final_lr(self) -> float:
        """The learning rate the cosine decays to."""
        return self.lr / 10 if self.min_lr is None else self.min_lr


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def config_problems(cfg: TrainConfig) -> list[str]:
    """Every option of `cfg` that cannot work, one sentence each (empty: all fine)."""
    out = []
    for name in ("steps", "batch_size", "eval_batches", "max_bytes"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            out.append(f"{name} must be an integer >= 1, got {v!r}")
    for name in ("warmup", "eval_every", "ckpt_every", "seed"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 0:
            out.append(f"{name} must be an integer >= 0, got {v!r}")
    if cfg.stop_at is not None and (not _is_int(cfg.stop_at) or cfg.stop_at < 1):
        out.append(f"stop_at must be None or an integer >= 1, got {cfg.stop_at!r}")
    if cfg.precision not in PRECISIONS:
        out.append(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    for name, positive in (("lr", True), ("min_lr", False), ("weight_decay", False),
                           ("grad_clip", True)):
        v = getattr(cfg, name)
        if name == "min_lr" and v is None:
            continue
        if not _is_real(v) or not math.isfinite(v) or v < 0 or (positive and v == 0):
            bound = "> 0" if positive else ">= 0"
            out.append(f"{name} must be a finite number {bound}, got {v!r}")
    if not out and cfg.final_lr > cfg.lr:
        out.append(f"min_lr {cfg.final_lr} is above lr {cfg.lr}: the schedule would rise")
    return out


def validate(cfg: TrainConfig) -> None:
    """Raise TrainConfigError listing every bad option of `cfg`."""
    problems = config_problems(cfg)
    if problems:
        raise TrainConfigError("; ".join(problems))


# ---- command-line types -----------------------------------------------------------------------
def _number(kind: type, test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse `type=` that parses `kind` and rejects values failing `test`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


# ---- user errors ------------------------------------------------------------------------------
def is_user_error(e: BaseException) -> bool:
    """Bad input rather than a bug: a path problem, or an alpha_jit error about a value given.

    alpha_jit's input errors are `AlphaJitError` and `ValueError` both (DataError,
    CheckpointError, PromptError, ...); a device name that matches nothing or a missing Vulkan
    loader are the user's setup. Internal failures (VulkanError, AssertionError, ...) are not.
    """
    if isinstance(e, OSError):
        return True
    if isinstance(e, (DeviceNotFoundError, NoVulkanLoaderError)):
        return True
    return isinstance(e, AlphaJitError) and isinstance(e, ValueError)


def error_message(e: BaseException) -> str:
    """The text after `prog: error:`; an OSError names the path it failed on."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return str(e)


__all__ = ["PRECISIONS", "TrainConfig", "TrainConfigError", "config_problems", "error_message",
           "is_user_error", "nonneg_float", "nonneg_int", "positive_float", "positive_int",
           "validate"]
