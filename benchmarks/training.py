"""The one training step both sides run: hyperparameters, batch, alpha_jit's and PyTorch's step.

Why one file: a speed ratio means something only if both sides do the same work. Here, side by
side, is everything that defines that work: nanoGPT's AdamW (betas 0.9/0.95, weight decay 0.1 on
matrices and embeddings only, a constant learning rate), clip_grad_norm_ at 1.0, no dropout,
the same initial weights (PyTorch loads alpha_jit's), the same batch of random tokens.

- alpha_jit: `@aj.compile(precision=...)` over forward, backward, clip and AdamW, the way
  `alpha_jit/train/trainer.py` builds its step (the optimizer fused into the step).
- PyTorch: `torch.autocast(bfloat16)` around the forward for bf16 (none for f32), backward,
  `clip_grad_norm_`, `torch.optim.AdamW(fused=True)` on CUDA; optionally `torch.compile` of the
  model (what nanoGPT compiles). `TorchGPT` uses `F.scaled_dot_product_attention`.

torch is imported inside the PyTorch functions only: the alpha_jit side needs none of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.configs import BenchConfig

LR = 6e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
CLIP = 1.0
STEP_PRECISIONS = ("bf16", "f32")  # f16 needs loss scaling on both sides: GEMMs only


def batch(bc: BenchConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and targets [B, T] (int32), the same for both sides and every step."""
    rng = np.random.default_rng(seed)
    shape = (bc.batch, bc.seq)
    vocab = bc.model.vocab_size
    return (rng.integers(0, vocab, shape).astype(np.int32),
            rng.integers(0, vocab, shape).astype(np.int32))


# ---- alpha_jit ----------------------------------------------------------------------------------
def alpha_model(bc: BenchConfig, seed: int) -> Any:
    """A freshly initialised `alpha_jit.nn.GPT` (nanoGPT's init, seeded)."""
    from alpha_jit import nn
    from alpha_jit.nn import random as nn_random

    nn.manual_seed(seed)
    nn_random.manual_seed(seed)
    return nn.GPT(bc.model)


def weights(model: Any) -> dict[str, np.ndarray]:
    """{parameter name: float32 copy}: what the PyTorch side starts from."""
    return {name: np.array(p.numpy(), dtype=np.float32) for name, p in model.named_parameters()}


def alpha_step(model: Any, precision: str) -> Any:
    """The compiled training step (a `CompiledFunction`); returns the loss handle per call."""
    import alpha_jit as aj
    from alpha_jit import nn

    opt = nn.optim.AdamW(model.optim_groups(WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS)

    @aj.compile(precision=precision)
    def train_step(x: Any, y: Any) -> Any:
        _, loss = model(x, y)
        loss.backward()
        nn.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        return loss

    return train_step


# ---- PyTorch ------------------------------------------------------------------------------------
def torch_model(bc: BenchConfig, init: dict[str, np.ndarray], device: str) -> Any:
    """`TorchGPT` (sdpa attention) holding `init`'s weights, on `device`."""
    from benchmarks.torch_gpt import TorchGPT

    return TorchGPT(bc.model, attention="sdpa").load_arrays(init).to(device)


def torch_step(model: Any, precision: str, device: str,
               compiled: bool = False) -> Callable[[Any, Any], Any]:
    """`step(x, y) -> loss tensor` (not synchronised): autocast forward, backward, clip, AdamW.
    `compiled`: the forward goes through `torch.compile(model)`; the optimizer stays eager."""
    import torch

    from benchmarks.torch_gpt import optim_groups

    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(optim_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS,
                            fused=cuda)  # fused: one kernel per parameter group, CUDA only
    forward = torch.compile(model) if compiled else model
    kind = "cuda" if cuda else "cpu"
    params = list(model.parameters())

    def step(x: Any, y: Any) -> Any:
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def torch_batch(xy: tuple[np.ndarray, np.ndarray], device: str) -> tuple[Any, Any]:
    import torch

    return tuple(torch.from_numpy(a).long().to(device) for a in xy)  # type: ignore[return-value]


def torch_sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
