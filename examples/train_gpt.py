"""Train a byte-level GPT (vocab 256) with a compiled step on the best Vulkan device found.

Default corpus: the Python standard library's .py files of the running interpreter (always
present, no download); `--data PATH` takes a text file, a folder, or a .bin of uint16 tokens.
The last line printed is one JSON object: first_loss, last_loss, val_loss, tokens_per_s,
params, device, precision, steps.

    python examples/train_gpt.py --steps 300
    python examples/train_gpt.py --steps 600 --resume        # continue from runs/gpt
"""

from __future__ import annotations

import argparse
import json
import os

from alpha_jit.train.trainer import TrainConfig, train


def main(argv: list[str] | None = None) -> dict:
    d = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="text file, folder, or .bin of uint16 tokens")
    ap.add_argument("--out", default=d.out_dir, help="checkpoint, metrics and plot folder")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch_size)
    ap.add_argument("--precision", choices=["f32", "f16", "bf16"], default=d.precision)
    ap.add_argument("--device", default=None, help="index or name substring of the device")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    ap.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    ap.add_argument("--config", choices=["default", "small", "gpt2"], default="default",
                    help="model shape (small/gpt2: the benchmark shapes)")
    ap.add_argument("--seed", type=int, default=d.seed)
    args = ap.parse_args(argv)
    if args.device is not None:
        os.environ["ALPHA_JIT_DEVICE"] = args.device
    model = dict(d.model)
    if args.config != "default":
        from alpha_jit.nn import CONFIGS

        shape = dict(CONFIGS[args.config])
        if "--batch" not in (argv or []):
            args.batch = shape.pop("batch")
        shape.pop("batch", None)
        model.update(shape)
    cfg = TrainConfig(data=args.data, out_dir=args.out, steps=args.steps, batch_size=args.batch,
                      precision=args.precision, lr=args.lr, eval_every=args.eval_every,
                      ckpt_every=args.ckpt_every, resume=args.resume, seed=args.seed,
                      model=model)
    result = train(cfg)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
