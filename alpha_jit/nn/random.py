"""Random tensors inside a compiled step, reproducible across replays and kernels.

`uniform(shape)` records a `rand_uniform` op keyed by the generator's seed, a per-call counter
fed by the host on every call (so each step draws new numbers without retracing) and a salt
unique to the call site within the trace (so two dropout layers differ). Same seed + same step
-> same mask, in the compiled step and in the reference interpreter alike.
"""

from __future__ import annotations

from alpha_jit import dtypes
from alpha_jit.ir import trace
from alpha_jit.tensor import Tensor, iota


class Generator:
    """Host side of the counter-based RNG: the seed and the per-call counter."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.calls = 0

    def next_hparams(self) -> dict[str, float]:
        self.calls += 1
        return {"counter": self.calls}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "calls": self.calls}

    def load_state_dict(self, d: dict) -> None:
        self.seed, self.calls = int(d["seed"]), int(d["calls"])


default_generator = Generator(0)


def manual_seed(seed: int) -> None:
    default_generator.seed = int(seed)
    default_generator.calls = 0


def counter(generator: Generator | None = None) -> Tensor:
    """The generator's per-call counter as an i32 scalar of the trace."""
    gen = generator or default_generator
    return Tensor(trace.current().hparam(gen, "counter", dtypes.int32), (), dtypes.int32)


def next_salt() -> int:
    """The salt of the next random draw in this trace: one per draw site, counting the
    draws fused attention makes for its dropout, so the fused and unfused forms of a program
    draw the same masks."""
    g = trace.current().graph
    return 1 + sum(1 for n in g.g.nodes if g.op(n) == "rand_uniform"
                   or (g.op(n) == "attention" and g.attrs(n).get("dropout", 0.0) > 0))


def uniform(shape: tuple, generator: Generator | None = None) -> Tensor:
    """f32 values in [0, 1) of `shape`, new on every call of the compiled step."""
    gen = generator or default_generator
    salt = next_salt()
    return trace.apply("rand_uniform", [counter(gen), iota(tuple(shape), -1)],
                       {"seed": gen.seed, "salt": salt})
