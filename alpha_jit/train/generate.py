"""Text generation from a trained GPT: load a checkpoint, then sample token by token.

One compiled forward over a fixed [1, block_size] window serves every length: the causal mask
means the logits at position t depend only on tokens up to t, so the prompt is padded on the
right and the row at its last position is read. Greedy at temperature 0; top-k picks the k
largest with a partial selection (np.argpartition), not a full sort. Bad input (a checkpoint
missing a tensor, a prompt that is not UTF-8, a negative temperature) raises an error naming it
before anything is compiled.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.errors import AlphaJitError
from alpha_jit.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    require_meta,
    require_tensors,
)


class PromptError(AlphaJitError, ValueError):
    """A prompt or sampling option that cannot be used; the message says which."""


def load_model(path: str | Path) -> nn.GPT:
    """The GPT stored in a trainer checkpoint (model tensors only)."""
    tensors, meta = load_checkpoint(path)
    require_meta(meta, ["config"], path=path)
    try:
        model = nn.GPT(nn.GPTConfig(**meta["config"]))
    except (TypeError, ValueError) as e:  # unknown or impossible fields in the stored config
        raise CheckpointError(f"checkpoint {path}: its model config is not usable: {e}") from e
    params = list(model.named_parameters())
    require_tensors(tensors, {f"model.{name}": tuple(p.shape) for name, p in params}, path=path)
    for name, p in params:
        p.assign(tensors[f"model.{name}"])
    return model


def prepare_prompt(tokens: list[int], block_size: int, truncate: bool) -> list[int]:
    if not tokens:
        raise PromptError("the prompt is empty: give at least one character (e.g. a newline)")
    if len(tokens) >= block_size:
        if not truncate:
            raise PromptError(f"the prompt has {len(tokens)} tokens but the model's block_size "
                              f"is {block_size}; shorten it or pass --truncate to keep the "
                              f"last {block_size - 1}")
        tokens = tokens[-(block_size - 1):]
    return list(tokens)


def pick(logits: np.ndarray, temperature: float, top_k: int | None,
         rng: np.random.Generator) -> int:
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < len(z):
        keep = np.argpartition(z, -top_k)[-top_k:]  # the k largest, in no particular order
        masked = np.full_like(z, -np.inf)
        masked[keep] = z[keep]
        z = masked
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(z), p=p))


class Sampler:
    def __init__(self, model: nn.GPT, precision: str = "f32"):
        self.model = model
        self.block = model.config.block_size

        @aj.compile(precision=precision)
        def forward(x):
            was = model.training
            model.eval()  # no dropout while sampling; the training step keeps its mode
            logits = model(x)[0]
            model.train(was)
            return logits

        self.forward = forward

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, seed: int = 0, truncate: bool = False) -> list[int]:
        check_sampling(max_new_tokens, temperature, top_k)
        tokens = prepare_prompt(prompt, self.block, truncate)
        rng = np.random.default_rng(seed)
        out = list(tokens)
        for _ in range(max_new_tokens):
            window = out[-self.block:]
            x = np.zeros((1, self.block), np.int32)
            x[0, :len(window)] = window
            logits = self.forward(x).numpy()[0, len(window) - 1]
            out.append(pick(logits, temperature, top_k, rng))
        return out[len(tokens):]


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Raise PromptError for a token count, temperature or top-k that cannot be sampled."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise PromptError(f"the number of tokens to generate must be >= 0, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise PromptError(f"temperature must be a finite number >= 0 (0 = greedy), "
                          f"got {temperature}")
    if top_k is not None and top_k < 0:
        raise PromptError(f"top-k must be >= 0 (0 = no limit), got {top_k}")


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if 0 < t < 256).decode("utf-8", errors="replace")


def encode(text: str) -> list[int]:
    """UTF-8 bytes of `text`; PromptError where it holds undecodable bytes from argv."""
    try:
        return list(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        # Python maps argv bytes that are not UTF-8 to lone surrogates U+DC80..U+DCFF.
        ch = text[e.start]
        what = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else \
            f"character U+{ord(ch):04X}"
        raise PromptError(f"the prompt is not valid UTF-8 text ({what} at position "
                          f"{e.start})") from None


__all__ = ["Sampler", "check_sampling", "load_model", "pick", "prepare_prompt", "encode",
           "decode", "PromptError"]
