"""Random small programs over the public tensor API, with a numpy twin of each.

Why: hand-picked op tests find the bugs someone thought of; the silent wrong results of issue 6
(returned views with the wrong shape, `==` returning a bool, NaN swallowed by max) were each a
combination nobody had written down. A seeded generator builds programs from the op table:
elementwise arithmetic with broadcasting and constants, comparisons and `where`, unary math,
reductions over every axis (and all axes, with and without keepdims), views (reshape,
transpose, slicing, integer indexing, broadcast_to), matmul, concat, int32 arithmetic; inputs
carry NaN, +-inf, zeros and ties. Each program exists twice, as alpha_jit source and as numpy
source, and prints as a self-contained pytest function that can be pasted into a test file.

Values stay away from boundaries where f32 round-off could flip a result (a sign under
`log`, a tie under `==`): domain-restricted ops read inputs (exact) or `abs(v) + 0.25`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

F32, I32 = "float32", "int32"
_CMP = ("<", "<=", ">", ">=", "==", "!=")


@dataclass
class Var:
    name: str
    value: np.ndarray  # the numpy twin's value (shape, dtype, and values to steer choices)
    leaf: bool  # an input: exact values, safe under log / sqrt / division


@dataclass
class Program:
    seed: int
    inputs: list[Var] = field(default_factory=list)
    lines: list[tuple[str, str, str]] = field(default_factory=list)  # (var, aj expr, np expr)
    returns: list[str] = field(default_factory=list)

    def aj_source(self) -> str:
        args = ", ".join(v.name for v in self.inputs)
        body = [f"    {v} = {e}" for v, e, _ in self.lines]
        return "\n".join([f"def prog({args}):", *body,
                          f"    return ({', '.join(self.returns)},)"])

    def np_source(self) -> str:
        args = ", ".join(v.name for v in self.inputs)
        body = [f"    {v} = {e}" for v, _, e in self.lines]
        return "\n".join([f"def ref({args}):", *body,
                          f"    return ({', '.join(self.returns)},)"])

    def input_arrays(self) -> list[np.ndarray]:
        return [v.value for v in self.inputs]

    def as_test(self) -> str:
        """A pytest function reproducing this program: paste it into a test file."""
        lines = [f"def test_random_program_{self.seed}():",
                 "    import numpy as np", "    import alpha_jit as aj",
                 "    from alpha_jit.nn import functional as F",
                 "    from tests.e2e.random_programs import NP_HELPERS",
                 "    globals().update(NP_HELPERS)", "    nan, inf = np.nan, np.inf"]
        for v in self.inputs:
            lit = np.array2string(v.value.ravel(), separator=", ", threshold=10**6,
                                  floatmode="unique").replace("\n", "")
            lines.append(f"    {v.name} = np.array({lit}, np.{v.value.dtype})"
                         f".reshape({v.value.shape})")
        lines += ["    " + ln for ln in self.aj_source().splitlines()]
        lines += ["    " + ln for ln in self.np_source().splitlines()]
        args = ", ".join(v.name for v in self.inputs)
        lines += [f"    got = aj.compile(prog)({args})", f"    want = ref({args})",
                  "    for g, w in zip(got, want, strict=True):",
                  "        assert g.numpy().shape == np.shape(w)",
                  "        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-5,"
                  " equal_nan=True)"]
        return "\n".join(lines)


# ---- the numpy twin's helpers (named like the alpha_jit calls they mirror) --------------------
def _lse(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isinf(m), np.zeros_like(m), m)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return (out if keepdims else np.squeeze(out, axis=axis)).astype(x.dtype)


def _gelu(x):
    c = np.float32(np.sqrt(2.0 / np.pi))
    return (0.5 * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))).astype(x.dtype)


def _gelu_erf(x):
    import math

    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1.0 + erf(x.astype(np.float64) * np.sqrt(0.5)))).astype(x.dtype)


def _mask(b):
    return np.asarray(b).astype(np.float32)


def _concat(xs, axis):
    return np.concatenate(xs, axis=axis)


NP_HELPERS = {"np": np, "_lse": _lse, "_gelu": _gelu, "_gelu_erf": _gelu_erf, "_mask": _mask,
              "_concat": _concat,
              "_sigmoid": lambda x: (1.0 / (1.0 + np.exp(-x))).astype(x.dtype),
              "_where": lambda c, a, b: np.where(c != 0, a, b).astype(np.result_type(a, b)),
              "_f32": np.float32}


def _np_eval(expr: str, env: dict[str, np.ndarray]) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(eval(expr, {**NP_HELPERS, "nan": np.nan, "inf": np.inf}, env))


# ---- the generator ------------------------------------------------------------------------------
class _Gen:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.prog = Program(seed)
        self.env: dict[str, np.ndarray] = {}
        self.vars: list[Var] = []

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    # inputs: broadcast-compatible shapes, special values, ties
    def make_inputs(self) -> None:
        rank = int(self.rng.integers(0, 4))
        base = tuple(int(d) for d in self.rng.integers(1, 6, rank))
        for i in range(int(self.rng.integers(1, 4))):
            shape = list(base[int(self.rng.integers(0, rank + 1)):] if i else base)
            shape = [1 if self.chance(0.2) else d for d in shape]
            if self.chance(0.15) and i:
                x = self.rng.integers(-4, 5, shape).astype(np.int32)
            else:
                x = (self.rng.standard_normal(shape) * 2).astype(np.float32)
                if self.chance(0.4):
                    x = np.round(x * 2) / 2  # a grid: equal values for == and ties for max
                if self.chance(0.4) and x.size:
                    flat = x.reshape(-1)
                    for _ in range(int(self.rng.integers(1, 3))):
                        flat[int(self.rng.integers(flat.size))] = self.pick(
                            [np.nan, np.inf, -np.inf, 0.0, -0.0])
                x = x.astype(np.float32)
            v = Var(f"a{i}", np.asarray(x), True)
            self.prog.inputs.append(v)
            self.vars.append(v)
            self.env[v.name] = v.value

    def emit(self, aj_expr: str, np_expr: str) -> Var | None:
        value = _np_eval(np_expr, self.env)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        if value.dtype not in (np.float32, np.int32) or value.size > 4096:
            return None
        name = f"v{len(self.prog.lines) + len(self.prog.inputs)}"
        self.prog.lines.append((name, aj_expr, np_expr))
        v = Var(name, value, False)
        self.env[name] = value
        self.vars.append(v)
        return v

    def floats(self) -> list[Var]:
        return [v for v in self.vars if v.value.dtype == np.float32]

    def safe(self, v: Var) -> tuple[str, str]:
        """(aj, np) expressions of a value safe under domain-restricted ops."""
        if v.leaf:
            return v.name, v.name
        return f"({v.name}.abs() + 0.25)", f"(np.abs({v.name}) + _f32(0.25))"

    def partner(self, v: Var) -> Var | None:
        """Another value whose shape broadcasts with v's."""
        ok = []
        for w in self.vars:
            if w.value.dtype != v.value.dtype:
                continue
            try:
                np.broadcast_shapes(v.value.shape, w.value.shape)
            except ValueError:
                continue
            ok.append(w)
        return self.pick(ok) if ok else None

    def step(self) -> None:
        v = self.pick(self.vars[-4:] if self.chance(0.6) else self.vars)
        if v.value.dtype == np.int32:
            return self.int_op(v)
        kind = self.pick(["arith", "arith", "const", "div", "minmax", "cmp", "where", "unary",
                          "unary", "domain", "pow", "reduce", "reduce", "view", "view",
                          "matmul", "concat"])
        getattr(self, f"op_{kind}")(v)

    def int_op(self, v: Var) -> None:
        w = self.partner(v)
        op = self.pick(["+", "-", "*", "cmp", "cast", "max"])
        if op == "cast":
            self.emit(f"{v.name}.astype('float32')", f"{v.name}.astype(np.float32)")
        elif op == "cmp":
            c = self.pick(_CMP)
            self.emit(f"({v.name} {c} {w.name})", f"_mask({v.name} {c} {w.name})")
        elif op == "max":
            self.emit(f"aj.maximum({v.name}, {w.name})", f"np.maximum({v.name}, {w.name})")
        else:
            self.emit(f"({v.name} {op} {w.name})", f"({v.name} {op} {w.name})")

    def op_arith(self, v: Var) -> None:
        w = self.partner(v)
        op = self.pick(["+", "-", "*"])
        self.emit(f"({v.name} {op} {w.name})", f"({v.name} {op} {w.name})")

    def op_const(self, v: Var) -> None:
        c = self.pick([2.0, -0.5, 1.5, 0.0, 3.0])
        op = self.pick(["+", "-", "*"])
        if self.chance(0.5):
            self.emit(f"({v.name} {op} {c})", f"({v.name} {op} _f32({c}))")
        else:
            self.emit(f"({c} {op} {v.name})", f"(_f32({c}) {op} {v.name})")

    def op_div(self, v: Var) -> None:
        if self.chance(0.3):
            c = self.pick([2.0, -4.0, 0.0, 0.5])
            self.emit(f"({v.name} / {c})", f"({v.name} / _f32({c}))")
            return
        w = self.partner(v)
        wa, wn = self.safe(w)
        self.emit(f"({v.name} / {wa})", f"({v.name} / {wn})")

    def op_minmax(self, v: Var) -> None:
        fn = self.pick(["maximum", "minimum"])
        if self.chance(0.4):
            self.emit(f"aj.{fn}({v.name}, 0.5)", f"np.{fn}({v.name}, _f32(0.5))")
        else:
            w = self.partner(v)
            self.emit(f"aj.{fn}({v.name}, {w.name})", f"np.{fn}({v.name}, {w.name})")

    def op_cmp(self, v: Var) -> None:
        c = self.pick(_CMP)
        w = self.partner(v)
        if self.chance(0.4) or not (v.leaf and w.leaf):  # derived values meet constants only
            k = self.pick([0.0, 0.5, 1.0, -1.0])
            self.emit(f"({v.name} {c} {k})", f"_mask({v.name} {c} _f32({k}))")
        else:
            self.emit(f"({v.name} {c} {w.name})", f"_mask({v.name} {c} {w.name})")

    def op_where(self, v: Var) -> None:
        w = self.partner(v)
        k = self.pick([0.0, 1.0])
        cond = f"({v.name} > {k})"
        self.emit(f"aj.where({cond}, {v.name}, {w.name})",
                  f"_where(_mask({v.name} > _f32({k})), {v.name}, {w.name})")

    def op_unary(self, v: Var) -> None:
        fn = self.pick(["exp", "tanh", "abs", "relu", "neg", "sigmoid", "gelu", "gelu_erf", "sin",
                        "cos"])
        aj_e, np_e = {
            "exp": (f"{v.name}.exp()", f"np.exp({v.name})"),
            "tanh": (f"{v.name}.tanh()", f"np.tanh({v.name})"),
            "abs": (f"{v.name}.abs()", f"np.abs({v.name})"),
            "relu": (f"{v.name}.relu()", f"np.maximum({v.name}, _f32(0))"),
            "neg": (f"(-{v.name})", f"(-{v.name})"),
            "sigmoid": (f"F.sigmoid({v.name})", f"_sigmoid({v.name})"),
            "gelu": (f"F.gelu({v.name}, approximate='tanh')", f"_gelu({v.name})"),
            "gelu_erf": (f"F.gelu({v.name})", f"_gelu_erf({v.name})"),
            "sin": (f"{v.name}.sin()", f"np.sin({v.name})"),
            "cos": (f"aj.cos({v.name})", f"np.cos({v.name})"),
        }[fn]
        self.emit(aj_e, np_e)

    def op_domain(self, v: Var) -> None:
        a, n = self.safe(v)
        fn = self.pick(["log", "sqrt", "rsqrt"])
        np_e = {"log": f"np.log({n})", "sqrt": f"np.sqrt({n})",
                "rsqrt": f"(_f32(1) / np.sqrt({n}))"}[fn]
        self.emit(f"{a}.{fn}()", np_e)

    def op_pow(self, v: Var) -> None:
        c = self.pick([2, 3, 0, -1, -2, 0.5, 1.5])
        a, n = (v.name, v.name) if isinstance(c, int) and c >= 0 else self.safe(v)
        self.emit(f"({a} ** {c})", f"({n} ** _f32({c}))" if not isinstance(c, int)
                  else f"({n} ** {c})")

    def op_reduce(self, v: Var) -> None:
        nd = v.value.ndim
        if nd == 0:
            return
        fn = self.pick(["sum", "mean", "max", "logsumexp"])
        keep = self.chance(0.4)
        axes: list = [int(self.rng.integers(-nd, nd))]
        if fn != "logsumexp":
            axes += [None] + ([(0, nd - 1)] if nd >= 2 else [])
        axis = self.pick(axes)
        if fn == "logsumexp":
            self.emit(f"{v.name}.logsumexp(axis={axis}, keepdims={keep})",
                      f"_lse({v.name}, {axis}, {keep})")
        else:
            self.emit(f"{v.name}.{fn}(axis={axis!r}, keepdims={keep})",
                      f"np.{fn}({v.name}, axis={axis!r}, keepdims={keep})")

    def op_view(self, v: Var) -> None:
        shape, nd = v.value.shape, v.value.ndim
        kind = self.pick(["reshape", "transpose", "getitem", "broadcast"])
        if kind == "reshape":
            new = self.factor(v.value.size)
            if new and self.chance(0.4):
                new[int(self.rng.integers(len(new)))] = -1
            new_s = ", ".join(map(str, new))
            self.emit(f"{v.name}.reshape({new_s})", f"{v.name}.reshape({tuple(new)})")
        elif kind == "transpose" and nd >= 2:
            perm = tuple(int(p) for p in self.rng.permutation(nd))
            self.emit(f"{v.name}.permute{perm}", f"{v.name}.transpose({perm})")
        elif kind == "getitem" and nd >= 1:
            parts = []
            for d in shape:
                r = self.rng.random()
                if r < 0.3:
                    parts.append(str(int(self.rng.integers(-d, d))))
                elif r < 0.7 and d > 1:
                    a = int(self.rng.integers(0, d))
                    b = int(self.rng.integers(a + 1, d + 1))
                    parts.append(f"{a}:{b}" if self.chance(0.7) else f"{a}:{b}:2")
                elif r < 0.8:
                    parts.append(f"{int(self.rng.integers(-d, d))}:")
                else:
                    parts.append(":")
            if self.chance(0.2):  # everything before the last dimension
                parts = ["...", parts[-1]]
            else:
                parts = parts[:int(self.rng.integers(1, nd + 1))]
            if self.chance(0.25):  # a new axis, or everything before the last index
                parts.insert(int(self.rng.integers(0, len(parts) + 1)), "None")
            idx = ", ".join(parts)
            self.emit(f"{v.name}[{idx}]", f"{v.name}[{idx}]")
        elif kind == "broadcast":
            new = [int(self.rng.integers(2, 4))] + [
                int(self.rng.integers(2, 4)) if d == 1 else d for d in shape]
            self.emit(f"{v.name}.broadcast_to({tuple(new)})",
                      f"np.broadcast_to({v.name}, {tuple(new)})")

    def factor(self, size: int) -> list[int]:
        dims, rest = [], size
        for p in (2, 3, 5, 2, 2, 3):
            if rest % p == 0 and self.chance(0.5):
                dims.append(p)
                rest //= p
        dims.append(rest)
        self.rng.shuffle(dims)
        return [int(d) for d in dims]

    def op_matmul(self, v: Var) -> None:
        nd = v.value.ndim
        if nd not in (2, 3):
            return
        t = f"{v.name}.permute(0, 2, 1)" if nd == 3 else f"{v.name}.T"
        tn = f"{v.name}.transpose(0, 2, 1)" if nd == 3 else f"{v.name}.T"
        if self.chance(0.5):
            self.emit(f"({v.name} @ {t})", f"({v.name} @ {tn})")
        else:
            self.emit(f"({t} @ {v.name})", f"({tn} @ {v.name})")

    def op_concat(self, v: Var) -> None:
        if v.value.ndim == 0:
            return
        w = next((w for w in self.vars if w is not v and w.value.shape == v.value.shape
                  and w.value.dtype == v.value.dtype), v)
        ax = int(self.rng.integers(-v.value.ndim, v.value.ndim))
        self.emit(f"aj.cat([{v.name}, {w.name}], dim={ax})",
                  f"_concat([{v.name}, {w.name}], {ax})")


def random_program(seed: int) -> Program:
    """A program of 2-8 ops over 1-3 inputs returning 1-3 values (views included)."""
    gen = _Gen(seed)
    gen.make_inputs()
    for _ in range(int(gen.rng.integers(2, 9))):
        gen.step()
    made = [v.name for v in gen.vars if not v.leaf]
    pool = made or [v.name for v in gen.vars]
    k = min(len(pool), int(gen.rng.integers(1, 4)))
    picks = [pool[-1]] + [str(x) for x in gen.rng.choice(pool, k - 1, replace=False)]
    gen.prog.returns = list(dict.fromkeys(picks))
    return gen.prog


def run_numpy(prog: Program) -> list[np.ndarray]:
    env: dict = {**NP_HELPERS, "nan": np.nan, "inf": np.inf}
    with np.errstate(all="ignore"):
        exec(prog.np_source(), env)  # noqa: S102 - our own generated source
        return [np.asarray(o) for o in env["ref"](*prog.input_arrays())]


def build_aj(prog: Program):
    import alpha_jit as aj
    from alpha_jit.nn import functional as F

    env: dict = {"aj": aj, "F": F, "np": np}
    exec(prog.aj_source(), env)  # noqa: S102 - our own generated source
    return aj.compile(env["prog"])
