"""The precision policy under bf16/f16, PyTorch autocast's: GEMMs read low precision and
accumulate in f32; a Linear's result (bias included) is rounded once to the low dtype; norms,
softmax, losses, reductions and the optimizer compute in f32.

Checked two ways: structurally on the compiled graph of a GPT step (a 16-bit value is a cast or
view, elementwise math on 16-bit values only (the GELU of a Linear's output), or a fused
kernel's result that only GEMMs and attention read; never a reduction or a loss), and
numerically against PyTorch autocast on the same weights and batch (loss within 5e-5;
gradients no further from a float64 reference than autocast's are).
"""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import dtypes, nn
from alpha_jit.ir.ops import registry

CFG = nn.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
B, T = 4, 12


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
            rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32))


def _grad_step(model: nn.GPT, precision: str):
    params = [p for _, p in model.named_parameters()]

    @aj.compile(precision=precision)
    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        return loss, grads

    return step


@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_only_gemm_operands_are_low_precision(precision):
    nn.manual_seed(0)
    step = _grad_step(nn.GPT(CFG), precision)
    g = step.trace(*_batch()).graph
    low = dtypes.dtype(precision)
    bad = []

    def gemm_operand(n):  # every use, through views and casts, is a GEMM or attention
        return all(g.op(u).startswith("attention") or registry.get(g.op(u)).lowering == "matmul"
                   or ((g.op(u) == "cast" or registry.get(g.op(u)).lowering == "view")
                       and gemm_operand(u)) for u in g.users(n))

    for n in g.topo():
        op = g.op(n)
        if g.dtype(n) != low:
            continue
        cls = registry.get(op).lowering
        if op == "cast" or cls == "view":
            continue
        if cls == "elementwise" and all(g.dtype(a) == low for a in g.args(n)
                                        if g.dtype(a).is_float):
            continue  # e.g. the GELU of a bf16 Linear output, as under PyTorch autocast
        if cls == "kernel" and gemm_operand(n):
            continue  # a norm / attention / loss-gradient kernel storing a GEMM's operand
        users = [g.op(u) for u in g.users(n)]
        bad.append(f"%{n} = {op} {g.dtype(n)}{list(g.shape(n))} used by {users} "
                   f"({g.prov(n).short()})")
    assert not bad, f"values computed or kept in {precision} outside GEMM operands:\n" + \
        "\n".join(bad[:20])
    matmuls = g.nodes_with_op("matmul")
    assert matmuls and all(g.dtype(n) == dtypes.float32 for n in matmuls)
    assert all(g.dtype(a) == low for n in matmuls for a in g.args(n))


def test_bf16_step_against_torch_autocast():
    torch = pytest.importorskip("torch", reason="the autocast comparison needs torch")
    from benchmarks.torch_gpt import from_alpha

    nn.manual_seed(3)
    model = nn.GPT(CFG)
    names = [name for name, _ in model.named_parameters()]
    x, y = _batch(3)
    loss, grads = _grad_step(model, "bf16")(x, y)
    got_loss = float(loss)
    got = {n: g.numpy().astype(np.float64) for n, g in zip(names, grads, strict=True)}

    def torch_run(dtype, autocast: bool):
        ref = from_alpha(model, attention="math").to(dtype)  # op for op like alpha_jit
        params = dict(ref.named_parameters())
        xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ref(xt, yt)
        out.backward()
        return float(out.detach()), {n: params[n].grad.double().numpy() for n in names}

    ref_loss, ref_grads = torch_run(torch.float64, autocast=False)
    ac_loss, ac_grads = torch_run(torch.float32, autocast=True)

    assert abs(got_loss - ac_loss) / abs(ac_loss) < 5e-5, (got_loss, ac_loss, ref_loss)
    assert abs(got_loss - ref_loss) <= abs(ac_loss - ref_loss) + 1e-5 * abs(ref_loss)

    def err(gr: dict) -> float:
        a = np.concatenate([gr[n].ravel() for n in names])
        b = np.concatenate([ref_grads[n].ravel() for n in names])
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    ours, theirs = err(got), err(ac_grads)
    assert ours <= theirs, f"gradient error vs float64: alpha_jit {ours:.3g}, autocast {theirs:.3g}"
