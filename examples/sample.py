"""Generate text from a checkpoint written by examples/train_gpt.py.

    python examples/sample.py --ckpt runs/gpt/ckpt.safetensors --prompt "def " --tokens 200
    python examples/sample.py --temperature 0          # greedy
"""

from __future__ import annotations

import argparse
import sys

from alpha_jit.errors import AlphaJitError
from alpha_jit.train.generate import Sampler, decode, encode, load_model


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="runs/gpt/ckpt.safetensors")
    ap.add_argument("--prompt", default="\n")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--truncate", action="store_true",
                    help="keep the end of a prompt longer than the model's context")
    args = ap.parse_args(argv)
    try:
        model = load_model(args.ckpt)
        out = Sampler(model).generate(encode(args.prompt), args.tokens, args.temperature,
                                      args.top_k or None, args.seed, args.truncate)
    except AlphaJitError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    text = decode(out)
    print(args.prompt + text)
    return text


if __name__ == "__main__":
    main()
