"""Train a byte-level GPT (vocab 256) with a compiled step on the best Vulkan device found.

Default corpus: the Python standard library's .py files of the running interpreter (always
present, no download); `--data PATH` takes a text file, a folder, or a .bin of uint16 tokens.
The last line printed is one JSON object: first_loss, last_loss, val_loss, tokens_per_s
(steady-state steps only), compile_s and first_step_s (the first step, which compiles),
params, device, precision, steps, checkpoint_step, checkpoint_refused, interrupted.

Ctrl-C (or SIGTERM) writes a checkpoint at the end of the current step and exits with status 0;
a second one aborts at once. A checkpoint is never replaced by one holding NaN or inf (the run
then exits with status 1). Bad options, paths or checkpoints exit with status 2.

    python examples/train_gpt.py --steps 300
    python examples/train_gpt.py --steps 600 --resume        # continue from runs/gpt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from alpha_jit.train.config import (
    TrainConfig,
    error_message,
    is_user_error,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from alpha_jit.train.trainer import train

TINY = dict(block_size=16, n_layer=1, n_head=2, n_embd=16, batch=4)  # a seconds-long smoke test


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="train_gpt.py", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="text file, folder, or .bin of uint16 tokens")
    ap.add_argument("--out", default=d.out_dir, help="checkpoint, metrics and plot folder")
    ap.add_argument("--steps", type=positive_int, default=d.steps)
    ap.add_argument("--batch", type=positive_int, default=None,
                    help=f"sequences per step (default {d.batch_size}, or the --config's)")
    ap.add_argument("--precision", choices=["f32", "f16", "bf16"], default=d.precision)
    ap.add_argument("--device", default=None, help="index or name substring of the device")
    ap.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    ap.add_argument("--min-lr", type=nonneg_float, default=None,
                    help="learning rate at the end of the cosine (default: lr / 10)")
    ap.add_argument("--warmup", type=nonneg_int, default=d.warmup, help="linear warmup steps")
    ap.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay)
    ap.add_argument("--grad-clip", type=positive_float, default=d.grad_clip,
                    help="max global gradient norm")
    ap.add_argument("--eval-every", type=nonneg_int, default=d.eval_every, help="0: at the end")
    ap.add_argument("--ckpt-every", type=nonneg_int, default=d.ckpt_every, help="0: at the end")
    ap.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    ap.add_argument("--config", choices=["default", "tiny", "small", "gpt2"], default="default",
                    help="model shape (tiny: a smoke test; small/gpt2: the benchmark shapes)")
    ap.add_argument("--seed", type=nonneg_int, default=d.seed)
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    d = TrainConfig()
    if args.min_lr is not None and args.min_lr > args.lr:
        ap.error(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.device is not None:
        os.environ["ALPHA_JIT_DEVICE"] = args.device
    model = dict(d.model)
    batch = d.batch_size
    if args.config != "default":
        from alpha_jit.nn import CONFIGS

        shape = dict(TINY if args.config == "tiny" else CONFIGS[args.config])
        batch = shape.pop("batch", batch)
        model.update(shape)
    cfg = TrainConfig(data=args.data, out_dir=args.out, steps=args.steps,
                      batch_size=args.batch or batch, precision=args.precision, lr=args.lr,
                      min_lr=args.min_lr, warmup=args.warmup, weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, eval_every=args.eval_every,
                      ckpt_every=args.ckpt_every, resume=args.resume, seed=args.seed,
                      model=model)
    try:
        result = train(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C; an interrupted save left the old file intact
        ckpt = Path(cfg.out_dir) / "ckpt.safetensors"
        kept = f"{ckpt} is the last checkpoint written" if ckpt.exists() else \
            "no checkpoint was written"
        print(f"{ap.prog}: interrupted; {kept}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug: keep the traceback
        ap.error(error_message(e))
    print(json.dumps(result))
    if result["checkpoint_refused"]:
        sys.exit(1)  # diverged: the JSON says why, the last good checkpoint is kept
    return result


if __name__ == "__main__":
    main()
