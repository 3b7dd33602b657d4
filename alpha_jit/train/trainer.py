"""The GPT training loop behind `examples/train_gpt.py`: data, compiled step, eval, checkpoints.

Kept in the package (not the example) so that tests drive it directly: `train(TrainConfig)`
returns the same summary the example prints. Everything that can fail on bad input (data path,
checkpoint, config mismatch) fails before the first kernel is compiled, and nothing on disk is
replaced except atomically.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.nn import random as nn_random
from alpha_jit.train.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from alpha_jit.train.data import BatchLoader, load_dataset, unigram_entropy
from alpha_jit.train.metrics import MetricsLog, Throughput


@dataclass
class TrainConfig:
    data: str | None = None  # text file, folder or .bin of uint16 tokens; None: Python stdlib
    out_dir: str = "runs/gpt"
    steps: int = 300
    batch_size: int = 8
    precision: str = "f32"
    lr: float = 3e-3
    min_lr: float = 3e-4
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
    model: dict = field(default_factory=lambda: dict(
        vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0))


def _opt_tensors(model: nn.GPT, opt: nn.optim.AdamW) -> dict[str, np.ndarray]:
    out = {}
    for name, p in model.named_parameters():
        out[f"model.{name}"] = p.numpy()
        out[f"optim.m.{name}"] = opt.m[p.state_key].numpy()
        out[f"optim.v.{name}"] = opt.v[p.state_key].numpy()
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "ckpt.safetensors"
        mcfg = nn.GPTConfig(**cfg.model)
        self.model_config = mcfg
        resume_state = None
        if cfg.resume:  # read and check before anything else happens
            tensors, meta = load_checkpoint(self.ckpt_path)
            check_compatible(meta["config"], mcfg.to_dict(), path=self.ckpt_path)
            resume_state = (tensors, meta)
        self.data = load_dataset(cfg.data, block_size=mcfg.block_size, max_bytes=cfg.max_bytes,
                                 vocab_size=mcfg.vocab_size)
        nn.manual_seed(cfg.seed)
        nn_random.manual_seed(cfg.seed)
        self.model = nn.GPT(mcfg)
        self.opt = nn.optim.AdamW(self.model.optim_groups(cfg.weight_decay), lr=cfg.lr,
                                  betas=(0.9, 0.95))
        self.opt.schedule = nn.optim.warmup_cosine(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr)
        self.train_loader = BatchLoader(self.data.train, mcfg.block_size, cfg.batch_size,
                                        seed=cfg.seed)
        self.val_loader = BatchLoader(self.data.val, mcfg.block_size, cfg.batch_size,
                                      seed=cfg.seed + 1)
        self.step = 0
        self.first_loss: float | None = None
        if resume_state is not None:
            self._restore(*resume_state)
        model, opt = self.model, self.opt

        @aj.compile(precision=cfg.precision)
        def train_step(x, y):
            loss = model(x, y)
            loss.backward()
            nn.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad()
            return loss

        @aj.compile(precision=cfg.precision)
        def eval_step(x, y):
            return model(x, y)

        self.train_step, self.eval_step = train_step, eval_step
        if resume_state is not None and train_step.loss_scaler is not None:
            tensors = resume_state[0]
            if "scaler.scale" in tensors:
                train_step.loss_scaler.scale.assign(tensors["scaler.scale"])
                train_step.loss_scaler.good_steps.assign(tensors["scaler.good_steps"])

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
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
        save_checkpoint(self.ckpt_path, tensors, meta)

    def _restore(self, tensors: dict[str, np.ndarray], meta: dict) -> None:
        for name, p in self.model.named_parameters():
            p.assign(tensors[f"model.{name}"])
            self.opt.m[p.state_key].assign(tensors[f"optim.m.{name}"])
            self.opt.v[p.state_key].assign(tensors[f"optim.v.{name}"])
        self.step = int(meta["step"])
        self.opt.step_count = int(meta["opt_steps"])
        self.first_loss = meta.get("first_loss")
        self.train_loader.load_state_dict(meta["train_loader"])
        nn_random.default_generator.load_state_dict(meta["rng"])

    # ---- loop ----------------------------------------------------------------------------------
    def evaluate(self) -> float:
        losses = [self.eval_step(x, y) for x, y in self.val_loader.eval_batches(
            self.cfg.eval_batches)]
        return float(np.mean([float(v) for v in losses]))

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.out / "metrics.jsonl")
        tokens_per_step = cfg.batch_size * self.model_config.block_size
        meter = Throughput()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train_gpt", unit="step",
                   disable=not cfg.progress, file=sys.stderr)
        pending: list[tuple[int, Any]] = []
        last_loss = val_loss = float("nan")
        t0 = time.perf_counter()
        start_step = self.step
        end = min(cfg.steps, cfg.stop_at or cfg.steps)
        while self.step < end:
            x, y = self.train_loader.next_batch()
            loss = self.train_step(x, y)
            self.step += 1
            pending.append((self.step, loss))
            bar.update(1)
            meter.tick(tokens_per_step)
            last = self.step == end
            if self.step % 10 == 0 or last or self.step == 1:
                for s, v in pending:  # reading values is the only sync point
                    value = float(v)
                    if self.first_loss is None:
                        self.first_loss = value
                    metrics.append(step=s, loss=value, lr=self.opt.lr_at(s))
                    last_loss = value
                pending = []
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{meter.rate:,.0f}")
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps:
                val_loss = self.evaluate()
                metrics.append(step=self.step, val_loss=val_loss)
                metrics.flush()
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                self.save()
                metrics.flush()
        bar.close()
        elapsed = time.perf_counter() - t0
        metrics.close()
        self._plot()
        done = self.step - start_step
        from alpha_jit.runtime import get_device

        return {"first_loss": self.first_loss, "last_loss": last_loss, "val_loss": val_loss,
                "tokens_per_s": round(done * tokens_per_step / elapsed, 1) if done else 0.0,
                "params": self.model.num_params(), "device": get_device().caps.name,
                "precision": cfg.precision, "steps": self.step,
                "unigram_entropy": round(unigram_entropy(self.data.train), 4)}

    def _plot(self) -> None:
        try:
            from alpha_jit.train.plot import plot_loss_curve

            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png",
                            entropy=unigram_entropy(self.data.train))
        except Exception as e:  # a missing plot must not lose a finished run
            print(f"[train_gpt] loss curve not written: {e}", file=sys.stderr)


def train(cfg: TrainConfig) -> dict[str, Any]:
    return Trainer(cfg).run()


__all__ = ["TrainConfig", "Trainer", "train"]
