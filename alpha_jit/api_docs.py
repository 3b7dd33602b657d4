"""The API reference as data: every public name, its PyTorch equivalent and the differences.

Why: `docs/api.md` is rendered from this table (`python -m alpha_jit.api_docs > docs/api.md`),
and `tests/test_api_docs.py` checks the table against the code: every name resolves, every
public name of the namespaces below has an entry, every op of the IR registry says which
calls record it, and the rendered page equals the file. The page cannot drift from the code.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str  # how a user reaches it: "Tensor.sum", "aj.cat", "F.gelu", "nn.Linear"
    torch: str  # the PyTorch equivalent ("" when there is none)
    note: str = ""  # how it differs, or what else it accepts


@dataclass(frozen=True)
class Unsupported:
    torch: str
    instead: str


# where each prefix lives
NAMESPACES = {"aj": "alpha_jit", "Tensor": "alpha_jit.tensor:TensorOps",
              "F": "alpha_jit.nn.functional", "nn": "alpha_jit.nn", "optim": "alpha_jit.nn.optim",
              "utils": "alpha_jit.nn.utils", "Module": "alpha_jit.nn.module:Module"}
_REDUCE = "`dim`/`keepdim` (numpy's `axis`/`keepdims` too); `dim` may be a tuple"


def E(name: str, torch: str = "", note: str = "") -> Entry:  # noqa: N802 - a table row
    return Entry(name, torch or _default_torch(name), note)


def _default_torch(name: str) -> str:
    prefix, _, attr = name.partition(".")
    return {"aj": f"torch.{attr}", "Tensor": f"torch.Tensor.{attr}",
            "F": f"torch.nn.functional.{attr}", "nn": f"torch.nn.{attr}",
            "optim": f"torch.optim.{attr}", "utils": f"torch.nn.utils.{attr}",
            "Module": f"torch.nn.Module.{attr}"}[prefix]


TENSOR = [
    E("Tensor.ndim"), E("Tensor.dim"), E("Tensor.numel"),
    E("Tensor.size", note="`size()` is the shape tuple, `size(d)` one dimension"),
    E("Tensor.sum", note=_REDUCE + "; `dtype=` casts first"), E("Tensor.mean", note=_REDUCE),
    E("Tensor.max", note="`max()` all, `max(dim)` a `(values, indices)` named tuple (the "
      "gradient goes to the index), `max(other)` elementwise; numpy's `max(axis=...)` gives "
      "the values alone; ties share `max()`/`amax` gradients evenly, as PyTorch"),
    E("Tensor.min", note="as `max`"), E("Tensor.amax"), E("Tensor.amin"),
    E("Tensor.argmax", note="i32 indices; NaN counts as the largest, the first of ties"),
    E("Tensor.argmin", note="as `argmax`"),
    E("Tensor.var", note="`correction` (default 1), `unbiased=`, numpy's `ddof=`; " + _REDUCE),
    E("Tensor.std", note="as `var`"),
    E("Tensor.logsumexp", note="default `dim=-1`"),
    E("Tensor.exp"), E("Tensor.log"), E("Tensor.tanh"), E("Tensor.sqrt"), E("Tensor.rsqrt"),
    E("Tensor.sin", note="own polynomials, ~1 ulp on every driver; NaN past |x| = 1e5 (no "
      "exact argument reduction there: reduce first)"),
    E("Tensor.cos", note="as `sin`"), E("Tensor.erf", note="|error| < 1.2e-7"),
    E("Tensor.sigmoid"), E("Tensor.abs"), E("Tensor.relu"), E("Tensor.floor"),
    E("Tensor.square"),
    E("Tensor.clamp", note="min then max, as PyTorch (min > max gives max)"),
    E("Tensor.clip", note="alias of `clamp`"),
    E("Tensor.masked_fill", note="the mask is any tensor, nonzero = fill"),
    E("Tensor.softmax"), E("Tensor.log_softmax"),
    E("Tensor.eq", note="returns an f32 mask (1.0 / 0.0): alpha_jit has no bool dtype"),
    E("Tensor.ne", note="as `eq`"),
    E("Tensor.logical_and", note="on masks (nonzero = true), returns an f32 mask"),
    E("Tensor.logical_or", note="as `logical_and`"), E("Tensor.logical_not", note="as above"),
    E("Tensor.astype", "torch.Tensor.to", "numpy's name"),
    E("Tensor.to", note="dtypes only; device arguments are accepted and ignored"),
    E("Tensor.type_as"), E("Tensor.float"), E("Tensor.half"), E("Tensor.bfloat16"),
    E("Tensor.int", note="i32"), E("Tensor.long", note="i32: alpha_jit's integers are 32-bit"),
    E("Tensor.bool", note="an f32 mask (1.0 where nonzero)"),
    E("Tensor.detach", note="records `stop_gradient`"),
    E("Tensor.contiguous", note="identity (layouts are the compiler's business)"),
    E("Tensor.clone", note="identity (a traced step has no in-place writes)"),
    E("Tensor.item", note="raises while tracing: return the tensor and call `float()` on the "
      "result"),
    E("Tensor.tolist", note="as `item`"),
    E("Tensor.backward", note="the loss must be a scalar; inside the compiled step"),
    E("Tensor.reshape"), E("Tensor.view", note="any reshape (views never fail); "
                           "`view(dtype)` is refused"),
    E("Tensor.view_as"), E("Tensor.reshape_as"), E("Tensor.flatten"), E("Tensor.unflatten"),
    E("Tensor.squeeze", note="`dim` int or tuple"), E("Tensor.unsqueeze"),
    E("Tensor.permute"),
    E("Tensor.transpose", note="`transpose(d0, d1)` swaps two dims; `transpose()` reverses "
      "all (numpy); a longer permutation raises and names `permute`"),
    E("Tensor.swapaxes"), E("Tensor.swapdims"), E("Tensor.t"),
    E("Tensor.T", note="all dims reversed"), E("Tensor.mT"),
    E("Tensor.swap_last", "torch.Tensor.mT", "alpha_jit's name for `mT`"),
    E("Tensor.broadcast_to"), E("Tensor.expand", note="-1 keeps a dimension"),
    E("Tensor.expand_as"), E("Tensor.repeat"), E("Tensor.narrow"), E("Tensor.split"),
    E("Tensor.chunk"), E("Tensor.unbind"), E("Tensor.select"), E("Tensor.tril"),
    E("Tensor.triu"),
]

OPERATORS = [
    ("`+ - * /`", "PyTorch's promotion: i32 with f32 is f32, i32 / i32 is f32, a Python "
     "float with an i32 tensor is f32"),
    ("`//`, `%`", "floor division and Python's remainder (the divisor's sign), as PyTorch"),
    ("`**`", "constant or tensor exponent; `2 ** x` too; numpy's values at 0, negatives, inf"),
    ("`@`", "matmul, batched and broadcast"),
    ("`< <= > >= == !=`", "elementwise, f32 masks"),
    ("`& | ~`", "logical on masks (f32 1.0 / 0.0); on integer tensors they raise "
     "(PyTorch's are bitwise there)"),
    ("`x[...]`", "ints (negative too), slices with any positive step, `None`, `...`, one "
     "integer array per index (list, numpy array, i32 tensor; negative wraps), a 1-D numpy "
     "bool mask. Traced bool masks and negative steps raise (data-dependent shape, "
     "PyTorch has none). `x[i] = v` raises: use `aj.where`/`masked_fill`"),
    ("`len(x)`, `iter(x)`", "the first dimension"),
]

FUNCTIONS = [
    E("aj.compile", "torch.compile", "traces the whole step (forward, backward, optimizer); "
      "`precision=` 'f32'|'bf16'|'f16'"),
    E("aj.CompiledFunction", "", "what `aj.compile` returns"),
    E("aj.Tensor", "torch.Tensor", "a traced value"),
    E("aj.StateTensor", "torch.Tensor", "device-resident data across steps (parameters, "
      "moments, buffers)"),
    E("aj.float32"), E("aj.float16"), E("aj.bfloat16"), E("aj.int32"),
    E("aj.float"), E("aj.half"), E("aj.long", note="i32"), E("aj.int", note="i32"),
    E("aj.AlphaJitError", "", "base of every alpha_jit error"),
    E("aj.TraceError", "", "an op misused while tracing (names the op and your line)"),
    E("aj.ShapeError", "", "shapes that do not fit"), E("aj.DTypeError", "", "dtypes"),
    E("aj.zeros"), E("aj.ones"), E("aj.empty", note="zeros"), E("aj.full",
                                                            note="dtype follows the value"),
    E("aj.zeros_like"), E("aj.ones_like"), E("aj.empty_like"), E("aj.full_like"),
    E("aj.arange", note="i32 when every bound is an int, else f32"), E("aj.linspace"),
    E("aj.eye"), E("aj.tril"), E("aj.triu"),
    E("aj.rand", note="new numbers on every call of the step (counter-based RNG)"),
    E("aj.randn", note="Box-Muller from two uniform draws"), E("aj.rand_like"),
    E("aj.randn_like"), E("aj.randint"),
    E("aj.tensor", note="a constant of the step: the value when traced"),
    E("aj.constant", "torch.tensor", "numpy arrays captured by the function become these"),
    E("aj.iota", "torch.arange", "an i32 index grid along one axis (-1: row-major)"),
    E("aj.cat", note="also `axis=`"), E("aj.concat"), E("aj.stack"),
    E("aj.where", note="the condition is any tensor, nonzero = true"),
    E("aj.maximum"), E("aj.minimum"), E("aj.max"), E("aj.min"), E("aj.amax"), E("aj.amin"),
    E("aj.matmul"), E("aj.mm"), E("aj.bmm"), E("aj.pow"), E("aj.remainder"),
    E("aj.floor_divide"),
    *[E(f"aj.{n}", note=f"`x.{n}(...)`") for n in (
        "abs", "argmax", "argmin", "chunk", "clamp", "cos", "erf", "exp", "flatten", "floor",
        "log", "log_softmax", "logsumexp", "masked_fill", "mean", "narrow", "numel", "permute",
        "reshape", "rsqrt", "sigmoid", "sin", "softmax", "split", "sqrt", "square", "squeeze",
        "std", "sum", "tanh", "transpose", "unbind", "unsqueeze", "var")],
]

FUNCTIONAL = [
    E("F.relu"), E("F.gelu", note="exact (erf) by default, `approximate='tanh'` GPT-2's"),
    E("F.sigmoid"), E("F.tanh"), E("F.silu"),
    E("F.softmax", note="`axis=` too; without a dim PyTorch's deprecated implicit choice"),
    E("F.log_softmax", note="as softmax"),
    E("F.dropout", note="counter-based mask, new each call; `training=False` is identity"),
    E("F.linear", note="weight [out, in]; under bf16/f16 the result is the low type"),
    E("F.embedding", note="`padding_idx` rows get no gradient; max_norm etc. raise"),
    E("F.one_hot", note="i32; `num_classes` must be given"),
    E("F.cross_entropy", note="logits [N, C], labels [N]; `reduction`, `label_smoothing`, "
      "`ignore_index` (default None: nothing ignored, a -100 label is an error); every row "
      "ignored gives 0, not PyTorch's NaN; class weights raise"),
    E("F.nll_loss", note="[N, C] only; `ignore_index` as cross_entropy; a target out of "
      "range is NaN (an argument: an error before the step)"), E("F.mse_loss"), E("F.l1_loss"),
    E("F.layer_norm", note="over the last dimension only (one fused kernel per direction)"),
    E("F.rms_norm", note="as layer_norm; eps None is f32's epsilon"),
    E("F.pad", note="constant mode"),
    E("F.scaled_dot_product_attention", note="fused flash attention (causal, GQA, dropout); "
      "`attn_mask` runs unfused: a numpy bool array keeps True, anything else is added"),
]

MODULES = [
    E("nn.Module", note="parameters, buffers and children registered by attribute as in "
      "PyTorch; called inside a trace it records its module path into every node"),
    E("nn.Parameter", note="f32 master data on the device; `requires_grad=`"),
    E("nn.Sequential", note="children named `0`, `1`, ...; indexing, slicing, append"),
    E("nn.ModuleList"), E("nn.ModuleDict"),
    E("nn.Linear", note="PyTorch's init; `device=` ignored, dtype f32 only"),
    E("nn.Embedding", note="`padding_idx`; max_norm / scale_grad_by_freq / sparse raise"),
    E("nn.LayerNorm", note="the last dimension only (a longer normalized_shape raises and "
      "says how to reshape)"),
    E("nn.RMSNorm", note="as LayerNorm; eps None is f32's epsilon"),
    E("nn.Dropout", note="follows `train()`/`eval()` (a mode change retraces the step)"),
    E("nn.ReLU"), E("nn.GELU", note="`approximate='none'` (default) or 'tanh'"), E("nn.SiLU"),
    E("nn.Tanh"), E("nn.Sigmoid"), E("nn.Identity"), E("nn.Softmax"), E("nn.Flatten"),
    E("nn.GPT", "", "nanoGPT-style; `forward(idx, targets=None)` returns `(logits, loss)`"),
    E("nn.GPTConfig", "", "MHA/GQA, layernorm/rmsnorm, gelu/swiglu, learned/RoPE positions, "
      "`tie_weights`, `norm_eps`, `mlp_hidden`, dropout"),
    E("nn.CONFIGS", "", "the benchmark shapes `small` and `gpt2`"),
    E("nn.Block", "", "a GPT block"), E("nn.MLP", "", "a GPT MLP"),
    E("nn.CausalSelfAttention", "", "a GPT attention layer (fused flash attention)"),
    E("nn.manual_seed", "torch.manual_seed", "parameter initialisation (numpy Generator)"),
    E("nn.functional"), E("nn.optim", "torch.optim"), E("nn.utils"),
    E("nn.clip_grad_norm_", "torch.nn.utils.clip_grad_norm_"),
    E("nn.StateDictError", "RuntimeError", "a state dict that does not fit (keys, shapes)"),
    E("nn.IncompatibleKeys", "torch.nn.modules.module._IncompatibleKeys"),
    E("nn.UnsupportedOptionError", "", "a PyTorch constructor option alpha_jit lacks"),
    E("Module.forward"), E("Module.train"), E("Module.eval"),
    E("Module.training", note="a property; read inside a step it makes the step depend on "
      "it (eval() retraces), unless the step sets it itself"),
    E("Module.parameters", note="a list (PyTorch: a generator)"), E("Module.named_parameters"),
    E("Module.buffers"), E("Module.named_buffers"), E("Module.children"),
    E("Module.named_children"), E("Module.modules"), E("Module.named_modules"),
    E("Module.get_submodule"), E("Module.add_module"), E("Module.register_module"),
    E("Module.register_parameter"),
    E("Module.register_buffer", note="numpy or StateTensor; `persistent=False` stays out of "
      "state_dict"),
    E("Module.state_dict", note="PyTorch's names; numpy arrays"),
    E("Module.load_state_dict", note="numpy arrays or torch tensors; checks every key and "
      "shape before writing anything"),
    E("Module.zero_grad"), E("Module.requires_grad_", note="freezing retraces the step"),
    E("Module.apply"), E("Module.extra_repr"),
    E("Module.name_parameters", "", "gives every parameter its full dotted name (automatic "
      "for registered children)"),
]

OPTIM = [
    E("optim.SGD", note="PyTorch's options and defaults; `foreach`/`fused` accepted (the "
      "update is always one fused kernel per parameter), `differentiable=True` raises"),
    E("optim.Adam", note="as SGD; `amsgrad`, `maximize`, `decoupled_weight_decay`"),
    E("optim.AdamW", note="as Adam"),
    E("optim.Optimizer", note="`param_groups`, `state_dict()`/`load_state_dict()` in "
      "PyTorch's format (a torch optimizer's state loads), `zero_grad()`; `lr` is fed per "
      "call (schedules never retrace), other options are compiled in and changing one raises"),
    E("optim.OptimizerError", "", "a bad or changed option"),
    E("optim.clip_grad_norm_", "torch.nn.utils.clip_grad_norm_", "the same as `utils.`"),
    E("optim.warmup_cosine", "torch.optim.lr_scheduler", "assign to `opt.schedule`: a host "
      "function of the step number"),
    E("utils.clip_grad_norm_", note="norm_type 2 or inf; returns the traced norm; "
      "`error_if_nonfinite=True` raises (check the returned norm after the step)"),
    E("utils.clip_grad_value_"),
]

UNSUPPORTED = [
    Unsupported("x[i] = v, x.add_(y), in-place ops", "build the new value: `aj.where`, "
                "`x.masked_fill(m, v)`, `x = x + y`"),
    Unsupported("x[mask] with a traced bool mask, torch.nonzero, torch.unique",
                "shapes must be known when tracing: `aj.where(mask, x, 0)`"),
    Unsupported("negative slice steps, torch.flip", "an integer-array index: "
                "`x[aj.arange(n - 1, -1, -1)]`"),
    Unsupported("float64, int64, bool dtypes", "f32 / bf16 / f16 and i32; masks are f32"),
    Unsupported("x.item(), float(x), if x > 0: inside the step",
                "return the value from the compiled function and read it after the call"),
    Unsupported("torch.einsum", "`permute`/`reshape` and `@`"),
    Unsupported("bitwise &, |, ~ on integer tensors", "arithmetic on i32, or masks"),
    Unsupported("F.cross_entropy(weight=...)", "`reduction='none'` times `weight[labels]`"),
    Unsupported("Tensor.view(dtype)", "`.to(dtype)` converts values"),
    Unsupported("calling ops on numpy arrays outside `aj.compile`",
                "wrap the call in a compiled function (the error says so)"),
]

# every op of the IR registry: the calls that record it (tests check this covers the registry)
OP_SOURCES = {
    "add": "`+`", "sub": "`-`", "mul": "`*`", "div": "`/`", "floordiv": "`//`",
    "remainder": "`%`",
    "neg": "unary `-`", "maximum": "`aj.maximum`, `clamp`", "minimum": "`aj.minimum`, `clamp`",
    "lt": "`<`", "le": "`<=`", "gt": "`>`", "ge": "`>=`", "eq": "`==`, `eq`", "ne": "`!=`, `ne`",
    "exp": "`exp`, `sigmoid`", "log": "`log`", "tanh": "`tanh`", "sqrt": "`sqrt`, `std`",
    "rsqrt": "`rsqrt`", "abs": "`abs`", "relu": "`relu`", "sin": "`sin`", "cos": "`cos`",
    "erf": "`erf`, `F.gelu`", "floor": "`floor`, `//`", "pow_scalar": "`x ** c`",
    "pow": "`x ** y`, `c ** x`", "gelu": "`F.gelu`", "gelu_grad": "the VJP of gelu",
    "where": "`aj.where`, `masked_fill`", "cast": "`to`, `astype`, `float`, ...",
    "copy": "internal (a materialised view)", "stop_gradient": "`detach`",
    "isfinite": "internal (f16 loss scaling)", "full": "`aj.full`, `zeros`, numbers",
    "iota": "`aj.arange`, `aj.iota`, masks", "input": "an argument of the compiled function",
    "state": "parameters, buffers, optimizer state, captured numpy constants",
    "hparam": "host scalars fed per call (learning rate, RNG counter)",
    "reshape": "`reshape`, `view`, `flatten`, `squeeze`, ...",
    "transpose": "`permute`, `transpose`, `T`", "broadcast_to": "`expand`, broadcasting",
    "slice": "`x[a:b]`, `split`, `narrow`", "pad": "`F.pad`, `cat`, the VJP of slice",
    "sum": "`sum`", "mean": "`mean`", "max": "`max`, `amax`, `argmax`",
    "logsumexp": "`logsumexp`, `softmax`", "matmul": "`@`, `F.linear`",
    "gather_rows": "`F.embedding`, integer-array and step indexing",
    "scatter_add_rows": "the VJP of gather_rows",
    "rand_uniform": "`F.dropout`, `aj.rand`, `aj.randn`",
    "sum_squares": "`clip_grad_norm_`",
    "layer_norm": "`nn.LayerNorm`, `F.layer_norm`", "rms_norm": "`nn.RMSNorm`, `F.rms_norm`",
    "norm_stats": "the VJP of the norms", "norm_dx": "the VJP of the norms",
    "norm_dwb": "the VJP of the norms",
    "cross_entropy_rows": "`F.cross_entropy`",
    "cross_entropy_rows_grad": "the VJP of cross_entropy_rows",
    "attention": "`F.scaled_dot_product_attention`",
    "attention_lse": "the VJP of attention", "attention_bwd_dq": "the VJP of attention",
    "attention_bwd_dk": "the VJP of attention", "attention_bwd_dv": "the VJP of attention",
}

SECTIONS: list[tuple[str, list[Entry]]] = [
    ("Tensor methods", TENSOR),
    ("Functions (`import alpha_jit as aj`)", FUNCTIONS),
    ("`alpha_jit.nn.functional` (as `F`)", FUNCTIONAL),
    ("Modules (`from alpha_jit import nn`)", MODULES),
    ("Optimizers (`alpha_jit.nn.optim`, `alpha_jit.nn.utils`)", OPTIM),
]


def resolve(name: str) -> Any:
    """The object an entry names (AttributeError if it does not exist)."""
    prefix, _, attr = name.partition(".")
    mod, _, cls = NAMESPACES[prefix].partition(":")
    obj: Any = importlib.import_module(mod)
    if cls:
        obj = getattr(obj, cls)
    for part in attr.split("."):
        obj = getattr(obj, part) if not isinstance(obj, dict) else obj[part]
    return obj


def public_names(prefix: str) -> set[str]:
    """What a namespace offers: `__all__` where it has one, else its own public functions."""
    mod, _, cls = NAMESPACES[prefix].partition(":")
    m = importlib.import_module(mod)
    if cls:
        return {n for n in dir(getattr(m, cls)) if not n.startswith("_")}
    if hasattr(m, "__all__"):
        return set(m.__all__)
    return {n for n, v in vars(m).items() if not n.startswith("_") and
            (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == m.__name__}


def _signature(name: str) -> str:
    try:
        obj = resolve(name)
        if isinstance(obj, property) or not callable(obj):
            return ""
        raw = inspect.signature(obj)
        params = [q.replace(annotation=inspect.Parameter.empty)
                  for q in raw.parameters.values() if q.name != "self"]
        sig = str(raw.replace(parameters=params, return_annotation=inspect.Signature.empty))
        return sig if len(sig) <= 70 else sig[:67] + "...)"
    except (TypeError, ValueError):
        return ""


def render() -> str:
    """docs/api.md."""
    out = ["# alpha_jit API reference", "",
           "Generated from `alpha_jit/api_docs.py` (`python -m alpha_jit.api_docs > "
           "docs/api.md`); `tests/test_api_docs.py` checks it against the code. A PyTorch "
           "model ports by changing imports (`import alpha_jit as torch` style names, "
           "`from alpha_jit import nn`, `from alpha_jit.nn import functional as F`); what "
           "differs is in the notes, and what does not port is listed at the end with the "
           "alternative.", ""]
    for title, entries in SECTIONS:
        out += [f"## {title}", "", "| alpha_jit | PyTorch | notes |", "|---|---|---|"]
        for e in entries:
            out.append(f"| `{e.name}{_signature(e.name)}` | "
                       f"{f'`{e.torch}`' if e.torch else '-'} | {e.note} |")
        out.append("")
        if title == "Tensor methods":
            out += ["### Operators", "", "| operator | semantics |", "|---|---|"]
            out += [f"| {op} | {note} |" for op, note in OPERATORS]
            out.append("")
    out += ["## Not supported, and what to write instead", "", "| PyTorch | instead |",
            "|---|---|"]
    out += [f"| `{u.torch}` | {u.instead} |" for u in UNSUPPORTED]
    out += ["", "## IR ops and the calls that record them", "",
            "Every op of the registry (`alpha_jit/ir/ops`), as `alpha-jit dump-ir` shows them.",
            "", "| op | recorded by |", "|---|---|"]
    out += [f"| `{op}` | {src} |" for op, src in sorted(OP_SOURCES.items())]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
