"""The GPT training loop behind `examples/train_gpt.py`: data, compiled step, eval, checkpoints.

Kept in the package (not the example) so that tests drive it directly: `train(TrainConfig)`
returns the same summary the example prints. Everything that can fail on bad input (options,
data path, checkpoint, config mismatch) fails before the first kernel is compiled.

The loop never loses good work: checkpoints are replaced atomically and only by finite state
(a NaN loss or weight keeps the last good file and says so); SIGINT/SIGTERM write a checkpoint
at the next step boundary and end the run normally; a resumed run first removes temporaries
from a killed save and the metrics rows logged after its checkpoint. Throughput counts
steady-state steps only; the first step's compile time is reported on its own.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.nn import random as nn_random
from alpha_jit.train.atomic import remove_stale_temps
from alpha_jit.train.checkpoint import (
    NonFiniteError,
    check_compatible,
    load_checkpoint,
    nonfinite_tensors,
    require_meta,
    require_tensors,
    save_checkpoint,
)
from alpha_jit.train.config import TrainConfig, TrainConfigError, validate
from alpha_jit.train.data import BatchLoader, load_dataset, unigram_entropy
from alpha_jit.train.metrics import MetricsLog, SteadyClock, Throughput, drop_rows_after
from alpha_jit.train.signals import GracefulStop

RESUME_META = ("config", "step", "opt_steps", "train_loader", "rng")  # what `_restore` reads
OUTPUT_FILES = ("ckpt.safetensors", "metrics.jsonl", "loss.png")  # files a run writes in out_dir


def _log(message: str) -> None:
    tqdm.write(f"[train_gpt] {message}", file=sys.stderr)  # clears the progress bar line first


def _opt_tensors(model: nn.GPT, opt: nn.optim.AdamW) -> dict[str, np.ndarray]:
    out = {}
    for name, p in model.named_parameters():
        out[f"model.{name}"] = p.numpy()
        out[f"optim.m.{name}"] = opt.m[p.state_key].numpy()
        out[f"optim.v.{name}"] = opt.v[p.state_key].numpy()
    return out


class Trainer:
    """One training run: build everything from a config (checking it first), then `run()`."""

    def __init__(self, cfg: TrainConfig):
        validate(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out_dir).expanduser()
        if self.out.exists() and not self.out.is_dir():
            raise TrainConfigError(f"output folder {self.out}: exists and is not a folder")
        self.ckpt_path = self.out / "ckpt.safetensors"
        mcfg = nn.GPTConfig(**cfg.model)
        self.model_config = mcfg
        resume_state = None
        if cfg.resume:  # read and check before anything else happens
            tensors, meta = load_checkpoint(self.ckpt_path)
            require_meta(meta, RESUME_META, path=self.ckpt_path)
            check_compatible(meta["config"], mcfg.to_dict(), path=self.ckpt_path)
            self._check_resume_step(int(meta["step"]))
            resume_state = (tensors, meta)
        self.data = load_dataset(cfg.data, block_size=mcfg.block_size, max_bytes=cfg.max_bytes,
                                 vocab_size=mcfg.vocab_size)
        nn.manual_seed(cfg.seed)
        nn_random.manual_seed(cfg.seed)
        self.model = nn.GPT(mcfg)
        self.opt = nn.optim.AdamW(self.model.optim_groups(cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.95))
        self.opt.schedule = nn.optim.warmup_cosine(cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr)
        self.train_loader = BatchLoader(self.data.train, mcfg.block_size, cfg.batch_size,
                                        seed=cfg.seed)
        self.val_loader = BatchLoader(self.data.val, mcfg.block_size, cfg.batch_size,
                                      seed=cfg.seed + 1)
        self.step = 0
        self.first_loss: float | None = None
        self.last_loss: float | None = None  # the latest loss read back (None: none yet)
        self.saved_step: int | None = None  # step of the good checkpoint on disk
        self.refused: str | None = None  # why the latest save was refused (None: it was not)
        self.diverged = False  # the weights hold NaN/inf: no later step can recover
        self._pending: list[tuple[int, Any]] = []  # (step, loss handle) not read back yet
        self._metrics: MetricsLog | None = None
        if resume_state is not None:
            self._restore(*resume_state)
            self.saved_step = self.step
        model, opt = self.model, self.opt

        @aj.compile(precision=cfg.precision)
        def train_step(x, y):
            _, loss = model(x, y)
            loss.backward()
            nn.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad()
            return loss

        @aj.compile(precision=cfg.precision)
        def eval_step(x, y):
            return model(x, y)[1]

        self.train_step, self.eval_step = train_step, eval_step
        if resume_state is not None and train_step.loss_scaler is not None:
            tensors = resume_state[0]
            if "scaler.scale" in tensors:
                train_step.loss_scaler.scale.assign(tensors["scaler.scale"])
                train_step.loss_scaler.good_steps.assign(tensors["scaler.good_steps"])

    def _check_resume_step(self, step: int) -> None:
        cfg = self.cfg
        if step >= cfg.steps:
            raise TrainConfigError(
                f"checkpoint {self.ckpt_path} is already at step {step}, and steps (--steps) is "
                f"{cfg.steps}: nothing to train; pass a larger --steps to continue it")
        if cfg.stop_at is not None and cfg.stop_at <= step:
            raise TrainConfigError(f"stop_at {cfg.stop_at} is not after the checkpoint's step "
                                   f"{step} ({self.ckpt_path})")

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> bool:
        """Write the checkpoint if the latest loss and every tensor are finite; True if written.

        A refused save leaves the previous checkpoint untouched and says so on stderr.
        """
        self._drain()
        meta = {"config": self.model_config.to_dict(), "step": self.step,
                "opt_steps": self.opt.step_count, "first_loss": self.first_loss,
                "train_loader": self.train_loader.state_dict(),
                "rng": nn_random.default_generator.state_dict(),
                "train_config": dataclasses.asdict(self.cfg)}
        tensors = _opt_tensors(self.model, self.opt)
        scaler = self.train_step.loss_scaler
        if scaler is not None:  # f16: the loss scale is training state too
            tensors["scaler.scale"] = scaler.scale.numpy()
            tensors["scaler.good_steps"] = scaler.good_steps.numpy()
        if self.last_loss is not None and not math.isfinite(self.last_loss):
            reason = f"the loss at step {self.step} is {self.last_loss}"
            self.diverged = bool(nonfinite_tensors(tensors))  # f16 may skip a step with inf
        else:
            try:
                save_checkpoint(self.ckpt_path, tensors, meta)
            except NonFiniteError as e:
                self.diverged = True
                reason = (f"{len(e.names)} tensor(s) hold NaN or inf at step {self.step} "
                          f"(e.g. {e.names[0]!r})")
            else:
                self.saved_step, self.refused = self.step, None
                return True
        self.refused = reason
        kept = (f"the last good one (step {self.saved_step}) is kept"
                if self.saved_step is not None and self.ckpt_path.exists()
                else "there is no earlier good one")
        _log(f"checkpoint {self.ckpt_path} NOT written: {reason}; {kept}")
        return False

    def _restore(self, tensors: dict[str, np.ndarray], meta: dict) -> None:
        params = list(self.model.named_parameters())
        expected = {}
        for name, p in params:
            for prefix in ("model", "optim.m", "optim.v"):
                expected[f"{prefix}.{name}"] = tuple(p.shape)
        require_tensors(tensors, expected, path=self.ckpt_path)
        for name, p in params:
            p.assign(tensors[f"model.{name}"])
            self.opt.m[p.state_key].assign(tensors[f"optim.m.{name}"])
            self.opt.v[p.state_key].assign(tensors[f"optim.v.{name}"])
        self.step = int(meta["step"])
        self.opt.step_count = int(meta["opt_steps"])
        self.first_loss = meta.get("first_loss")
        self.train_loader.load_state_dict(meta["train_loader"])
        nn_random.default_generator.load_state_dict(meta["rng"])

    def _clean_out_dir(self) -> None:
        """Remove what a killed run left: temporaries of interrupted saves, rows past the ckpt."""
        for name in OUTPUT_FILES:
            for stale in remove_stale_temps(self.out / name):
                _log(f"removed {stale}: a temporary file from an interrupted save")
        path = self.out / "metrics.jsonl"
        dropped = drop_rows_after(path, self.step)
        if dropped:
            why = "logged after the checkpoint" if self.step else "from an earlier run"
            _log(f"{path}: dropped {dropped} row(s) after step {self.step} ({why})")

    # ---- loop ----------------------------------------------------------------------------------
    def evaluate(self) -> float:
        losses = [self.eval_step(x, y) for x, y in self.val_loader.eval_batches(
            self.cfg.eval_batches)]
        return float(np.mean([float(v) for v in losses]))

    def _drain(self) -> None:
        """Read back every pending loss (the sync point) into the metrics log."""
        for s, v in self._pending:
            value = float(v)
            if self.first_loss is None:
                self.first_loss = value
            if self._metrics is not None:
                self._metrics.append(step=s, loss=value, lr=self.opt.lr_at(s))
            self.last_loss = value
        self._pending = []

    def run(self, on_step: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
        """Train to `cfg.steps` (or `stop_at`, a signal, divergence); returns the summary.

        `on_step(trainer)` is called after every step, before its eval and checkpoint.
        """
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._clean_out_dir()
        metrics = self._metrics = MetricsLog(self.out / "metrics.jsonl")
        tokens_per_step = cfg.batch_size * self.model_config.block_size
        meter, steady = Throughput(), SteadyClock()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train_gpt", unit="step",
                   disable=not cfg.progress, file=sys.stderr)
        val_loss = float("nan")
        compile_s = first_step_s = None
        start_step = self.step
        end = min(cfg.steps, cfg.stop_at or cfg.steps)
        stop = GracefulStop(enabled=cfg.handle_signals)
        try:
            with stop:
                while self.step < end:
                    x, y = self.train_loader.next_batch()
                    t_call = time.perf_counter()
                    self._pending.append((self.step + 1, self.train_step(x, y)))
                    if compile_s is None:  # the first call traces and compiles, then submits
                        compile_s = time.perf_counter() - t_call
                    self.step += 1
                    bar.update(1)
                    meter.tick(tokens_per_step)
                    if on_step is not None:
                        on_step(self)
                    eval_due = bool(cfg.eval_every and self.step % cfg.eval_every == 0) \
                        or self.step == cfg.steps
                    boundary = stop.requested or self.step == end or eval_due \
                        or bool(cfg.ckpt_every and self.step % cfg.ckpt_every == 0)
                    if self.step % 10 == 0 or self.step == start_step + 1 or boundary:
                        self._drain()
                        if first_step_s is None:  # steady state starts after the first sync
                            first_step_s = time.perf_counter() - t_call
                        steady.run()
                        bar.set_postfix(loss=f"{self.last_loss:.3f}", tok_s=f"{meter.rate:,.0f}")
                    if not boundary:
                        continue
                    steady.pause()  # eval, checkpoint and plots are not training throughput
                    if eval_due:
                        val_loss = self.evaluate()
                        metrics.append(step=self.step, val_loss=val_loss)
                        metrics.flush()
                    if stop.requested:  # also a signal that arrived during the eval
                        _log(f"{stop.signal_name}: writing a checkpoint at step {self.step} and "
                             "stopping (send it again to abort at once)")
                    last = self.step == end or stop.requested
                    if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                        self.save()
                        metrics.flush()
                        if self.diverged:
                            _log(f"stopping at step {self.step}: the weights are not finite, "
                                 "no further step can recover them")
                            break
                    if last:
                        break
                    steady.run()
        finally:
            steady.pause()
            bar.close()
            metrics.close()
        self._plot()
        from alpha_jit.runtime import get_device

        steady_steps = self.step - start_step - 1  # every step but the compiling first one
        rate = steady_steps * tokens_per_step / steady.seconds \
            if steady_steps > 0 and steady.seconds > 0 else None
        return {"first_loss": self.first_loss,
                "last_loss": self.last_loss if self.last_loss is not None else float("nan"),
                "val_loss": val_loss,
                "tokens_per_s": None if rate is None else round(rate, 1),
                "compile_s": None if compile_s is None else round(compile_s, 3),
                "first_step_s": None if first_step_s is None else round(first_step_s, 3),
                "params": self.model.num_params(), "device": get_device().caps.name,
                "precision": cfg.precision, "steps": self.step,
                "checkpoint_step": self.saved_step, "checkpoint_refused": self.refused,
                "interrupted": stop.signal_name,
                "unigram_entropy": round(unigram_entropy(self.data.train), 4)}

    def _plot(self) -> None:
        try:
            from alpha_jit.train.plot import plot_loss_curve

            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png",
                            entropy=unigram_entropy(self.data.train))
        except Exception as e:  # a missing plot must not lose a finished run
            print(f"[train_gpt] loss curve not written: {e}", file=sys.stderr)


def train(cfg: TrainConfig, on_step: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
    """Build a Trainer from `cfg` and run it; returns the summary the example prints."""
    return Trainer(cfg).run(on_step)


__all__ = ["TrainConfig", "TrainConfigError", "Trainer", "train"]
