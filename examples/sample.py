"""Generate text from a checkpoint written by examples/train_gpt.py.

Bad options (no tokens to generate, a negative temperature, a prompt that is not UTF-8) and a
missing or unusable checkpoint print `sample.py: error: ...` and exit with status 2.

    python examples/sample.py --ckpt runs/gpt/ckpt.safetensors --prompt "def " --tokens 200
    python examples/sample.py --temperature 0          # greedy
"""

from __future__ import annotations

import argparse

from alpha_jit.train.config import (
    error_message,
    is_user_error,
    nonneg_float,
    nonneg_int,
    positive_int,
)
from alpha_jit.train.generate import PromptError, Sampler, decode, encode, load_model


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sample.py", description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="runs/gpt/ckpt.safetensors")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--tokens", type=positive_int, default=200, help="tokens to generate")
    ap.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=nonneg_int, default=40, help="0 = no limit")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--truncate", action="store_true",
                    help="keep the end of a prompt longer than the model's context")
    return ap


def main(argv: list[str] | None = None) -> str:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        prompt = encode(args.prompt)  # before loading anything: argv may hold non-UTF-8 bytes
    except PromptError as e:
        ap.error(f"--prompt: {e}")
    try:
        model = load_model(args.ckpt)
        out = Sampler(model).generate(prompt, args.tokens, args.temperature,
                                      args.top_k or None, args.seed, args.truncate)
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug: keep the traceback
        ap.error(error_message(e))
    text = decode(out)
    print(args.prompt + text)
    return text


if __name__ == "__main__":
    main()
