"""Train a 2-layer MLP classifier on a synthetic spiral dataset with a compiled step.

The whole step (forward, cross-entropy, backward, AdamW update) is one `@alpha_jit.compile`
function; after the first call it is a single re-submitted Vulkan command buffer. The last line
printed is one JSON object: first_loss, last_loss, steps, device.

    python examples/train_mlp.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from tqdm import tqdm

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.nn import functional as F


def spirals(n: int, classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`classes` interleaved noisy spirals in 2-D: not linearly separable, easy for an MLP."""
    per = n // classes
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, per)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, per) + rng.normal(0, 0.2, per)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(per, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    nn.manual_seed(args.seed)
    x_all, y_all = spirals(3000, args.classes, rng)
    model = nn.Sequential(nn.Linear(2, args.hidden), nn.ReLU(),
                          nn.Linear(args.hidden, args.hidden), nn.GELU(),
                          nn.Linear(args.hidden, args.classes))
    opt = nn.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)

    @aj.compile
    def train_step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    first = last = None
    losses = []
    bar = tqdm(range(args.steps), desc="train_mlp", unit="step", file=sys.stderr)
    for it in bar:
        idx = rng.integers(0, len(x_all), args.batch)
        loss = train_step(x_all[idx], y_all[idx])
        losses.append(loss)
        if it % 20 == 0 or it == args.steps - 1:
            value = float(loss)  # the only point where the host waits for the GPU
            bar.set_postfix(loss=f"{value:.4f}")
    first = float(np.mean([float(v) for v in losses[:10]]))
    last = float(np.mean([float(v) for v in losses[-10:]]))
    from alpha_jit.runtime import get_device

    result = {"first_loss": round(first, 6), "last_loss": round(last, 6), "steps": args.steps,
              "device": get_device().caps.name}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
