"""A tiny GPT config and corpus shared by the trainer and example tests (seconds on lavapipe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alpha_jit.train.config import TrainConfig

TINY = dict(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1)


def write_corpus(path: Path) -> Path:
    """A few thousand words of a small vocabulary: learnable in a dozen steps."""
    rng = np.random.default_rng(0)
    words = ["alpha", "jit", "vulkan", "kernel", "tensor", "graph", "step", "\n"]
    path.write_text(" ".join(rng.choice(words, 4000)))
    return path


def tiny_config(root: Path, corpus: Path, **kw) -> TrainConfig:
    """A TrainConfig writing to root/run; keyword arguments override any field."""
    base = dict(data=str(corpus), out_dir=str(root / "run"), steps=12, batch_size=4,
                eval_every=6, eval_batches=2, warmup=2, lr=1e-2, progress=False, model=TINY)
    base.update(kw)
    return TrainConfig(**base)
