"""A model of your own, PyTorch-style: a custom layer, compiled train and eval steps, saving
and loading through `state_dict`, and a profile of the training step.

The model classifies sequences of 2-D points (noisy spirals traced point by point) with a
custom gated residual layer, attention pooling and dropout. Everything is written as it would
be in PyTorch; only the imports differ. The last line printed is one JSON object:
first_loss, last_loss, eval_accuracy, reloaded_accuracy, traces, steps, device.

    python examples/custom_model.py --steps 300
    alpha-jit profile examples/custom_model.py --steps 20     # the same profile, from the CLI
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.nn import functional as F


class GatedResidual(nn.Module):
    """The custom layer: x + sigmoid(gate(x)) * mlp(norm(x)), a learned per-feature gate."""

    def __init__(self, dim: int, hidden: int, p: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gate = nn.Linear(dim, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        return x + self.drop(self.gate(x).sigmoid() * self.mlp(self.norm(x)))


class SequenceClassifier(nn.Module):
    def __init__(self, points: int, dim: int, classes: int, depth: int, p: float):
        super().__init__()
        self.embed = nn.Linear(2, dim)
        self.pos = nn.Parameter(aj.randn(1, points, dim) * 0.02)
        self.layers = nn.ModuleList([GatedResidual(dim, 2 * dim, p) for _ in range(depth)])
        self.score = nn.Linear(dim, 1)  # attention pooling over the points
        self.head = nn.Linear(dim, classes)

    def forward(self, pts):  # pts [B, points, 2]
        x = self.embed(pts) + self.pos
        for layer in self.layers:
            x = layer(x)
        w = F.softmax(self.score(x).squeeze(-1), dim=-1)  # [B, points]
        pooled = (w.unsqueeze(-1) * x).sum(dim=1)
        return self.head(pooled)


def spiral_sequences(n: int, points: int, classes: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each sample: `points` consecutive points of one of `classes` spiral arms, with noise."""
    y = rng.integers(0, classes, n)
    start = rng.uniform(0.0, 2.0, (n, 1))
    t = start + np.linspace(0.0, 2.0, points)[None, :]
    angle = t * 2.0 + y[:, None] * (2 * np.pi / classes)
    r = t / 4.0
    pts = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=-1)
    pts += rng.normal(0.0, 0.03, pts.shape)
    return pts.astype(np.float32), y.astype(np.int32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="print a profile of the step")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    nn.manual_seed(args.seed)
    model = SequenceClassifier(args.points, args.dim, args.classes, depth=2, p=0.1)
    opt = nn.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    print(model, file=sys.stderr)

    @aj.compile
    def train_step(pts, y):
        model.train()
        loss = F.cross_entropy(model(pts), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss

    @aj.compile
    def eval_step(pts, y):
        model.eval()  # no dropout; the train step sets its own mode, so neither retraces
        logits = model(pts)
        return F.cross_entropy(logits, y), (logits.argmax(dim=-1) == y).float().mean()

    losses = []
    bar = tqdm(range(args.steps), desc="custom_model", unit="step", file=sys.stderr)
    for it in bar:
        pts, y = spiral_sequences(args.batch, args.points, args.classes, rng)
        losses.append(train_step(pts, y))
        if it % 25 == 0 or it == args.steps - 1:
            bar.set_postfix(loss=f"{float(losses[-1]):.4f}")  # reading waits for the GPU
    test_pts, test_y = spiral_sequences(512, args.points, args.classes, rng)
    _, acc = eval_step(test_pts, test_y)

    # save and load through state_dict: a fresh model, the weights from a safetensors file
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file(model.state_dict(), str(path))
        nn.manual_seed(args.seed + 1)
        fresh = SequenceClassifier(args.points, args.dim, args.classes, depth=2, p=0.1)
        fresh.load_state_dict(load_file(str(path)))
    fresh.eval()
    reloaded = aj.compile(lambda pts, y: (fresh(pts).argmax(dim=-1) == y).float().mean())

    if args.profile:
        prof = train_step.profile(pts, y, steps=5)  # runs (and trains) the step a few times
        print(prof.format(top=8), file=sys.stderr)

    from alpha_jit.runtime import get_device

    result = {"first_loss": round(float(np.mean([float(v) for v in losses[:10]])), 6),
              "last_loss": round(float(np.mean([float(v) for v in losses[-10:]])), 6),
              "eval_accuracy": round(float(acc), 4),
              "reloaded_accuracy": round(float(reloaded(test_pts, test_y)), 4),
              "traces": train_step.traces + eval_step.traces,  # 2: no mode change retraced
              "steps": args.steps, "device": get_device().caps.name}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
