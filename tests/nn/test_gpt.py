"""The GPT and its options: parity with the reference interpreter, dropout, accumulation."""

from __future__ import annotations

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.ir import interpreter
from alpha_jit.nn import functional as F
from alpha_jit.nn import random as nn_random

TINY = dict(vocab_size=32, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=False)
OPTIONS = {
    "base": {},
    "rmsnorm_swiglu_rope_gqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2),
    "mqa": dict(n_kv_head=1, pos="rope"),
    "dropout_gqa": dict(dropout=0.2, n_kv_head=2),  # fused attention draws the mask
}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert not np.isnan(a).any(), "NaN"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def batch(rng, b=4, t=16, vocab=32):
    return (rng.integers(0, vocab, (b, t)).astype(np.int32),
            rng.integers(0, vocab, (b, t)).astype(np.int32))


def one_step_parity(precision: str, options: dict, tol: float, sgd: bool = False) -> None:
    """One compiled step against the interpreter on its graph. sgd: plain SGD, and each
    parameter's update (new - old) is compared, a gradient check: AdamW's first update is
    about lr * sign(g), where 16-bit round-off may flip the sign of a near-zero gradient."""
    from alpha_jit.nn.random import manual_seed as dropout_seed

    nn.manual_seed(0)
    dropout_seed(0)  # dropout draws do not depend on which tests ran before
    model = nn.GPT(nn.GPTConfig(**{**TINY, **options}))
    opt = nn.optim.SGD(model.parameters(), lr=0.1) if sgd else \
        nn.optim.AdamW(model.optim_groups(0.1), lr=1e-3)

    @aj.compile(precision=precision)
    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        norm = nn.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss, norm

    x, y = batch(np.random.default_rng(0))
    before = {p.state_key: p.numpy() for p in model.parameters()}
    consts = {}
    for m in [b.attn for b in model.blocks]:
        if m.rope:
            consts[m.rope_cos.state_key] = m.rope_cos.numpy()
            consts[m.rope_sin.state_key] = m.rope_sin.numpy()
    if step.loss_scaler is not None:  # f16: the scale and clean-step count are state too
        for s in (step.loss_scaler.scale, step.loss_scaler.good_steps):
            consts[s.state_key] = s.numpy()
    loss, norm = step(x, y)
    tr = step.last_traced
    (exe,) = [e for es in step.cache.values() for e in es]
    state0 = {k: before.get(k, consts.get(k, np.zeros(h.shape, np.float32)))
              for k, h in tr.state.items()}
    outs, writes = interpreter.run(tr.graph, tr.leaves([x, y], state0, exe.last_hparams))
    assert rel(float(loss), outs[0]) < tol
    assert rel(float(norm), outs[1]) < tol
    updates = {tr.state[key].state_name: (tr.state[key].numpy() - before[key], want - before[key])
               for key, want in writes.items() if sgd and key in before}
    for key, want in writes.items():
        name = tr.state[key].state_name
        if name in updates:
            got, want = updates[name]
            floor = 1e-5
            if name.endswith("attn.k.bias"):
                # its gradient is a sum that cancels (softmax ignores a shift shared by all
                # keys: exactly 0 with learned positions, mostly under RoPE, which rotates the
                # bias per position); its error is round-off of terms as large as the query
                # bias's uncancelled sum (16-bit dS under bf16, as in PyTorch's flash
                # attention), so it is measured against that update
                floor = max(floor, float(np.linalg.norm(updates[name[:-6] + "q.bias"][1])))
            err = np.linalg.norm(got - want) / max(np.linalg.norm(want), floor)
            assert err < tol, name
            continue
        assert rel(tr.state[key].numpy(), want) < tol, name
    if precision == "f32" and not options:  # every module of a whole GPT step validates
        from alpha_jit.codegen_spirv import tools

        for b in exe.binaries:
            tools.validate(b.words, b.name)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_gpt_step_matches_reference_f32(name):
    # with dropout some weights get tiny gradients, whose AdamW update g/(|g|+eps) amplifies
    # f32 round-off (the 1e-4 per-tensor tolerance the PyTorch parity tests use)
    one_step_parity("f32", OPTIONS[name], 1e-4 if "dropout" in OPTIONS[name] else 1e-5)


@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_gpt_step_matches_reference_low_precision(precision):
    one_step_parity(precision, {}, 1e-2)


def test_weight_tying_and_param_count():
    nn.manual_seed(0)
    cfg = nn.GPTConfig(**TINY)
    model = nn.GPT(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and not any("head" in n for n in names)
    c, v, t, L = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    per_block = 4 * c * c + c + 8 * c * c + c  # attn, ln1, mlp, ln2 (no biases)
    assert model.num_params() == v * c + t * c + L * per_block + c


def test_dropout_mask_is_deterministic_and_matches_reference():
    @aj.compile
    def f(x):
        return F.dropout(x, 0.5)

    x = np.ones((64, 33), np.float32)
    nn_random.manual_seed(7)
    a = f(x).numpy()
    b = f(x).numpy()  # next step: a new mask
    nn_random.manual_seed(7)
    c = f(x).numpy()  # same seed + same step: the same mask
    np.testing.assert_array_equal(a, c)
    assert (a != b).any()
    assert set(np.unique(a)) <= {0.0, 2.0}
    assert 0.4 < (a > 0).mean() < 0.6
    tr = f.last_traced
    (exe,) = [e for es in f.cache.values() for e in es]
    ref, _ = interpreter.run(tr.graph, tr.leaves([x], {}, exe.last_hparams))
    np.testing.assert_array_equal(ref[0], c)  # replay == reference


def test_grad_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(1)
    x, y = batch(rng, b=8)
    results = []
    for micro in (1, 2):
        nn.manual_seed(3)
        model = nn.GPT(nn.GPTConfig(**TINY))
        opt = nn.optim.SGD(model.parameters(), lr=0.5)

        @aj.compile
        def step(xs, ys, micro=micro, model=model, opt=opt):
            for i in range(micro):
                (model(xs[i], ys[i])[1] * (1.0 / micro)).backward()
            opt.step()
            opt.zero_grad()

        step(x.reshape(micro, 8 // micro, 16), y.reshape(micro, 8 // micro, 16))
        results.append({n: p.numpy() for n, p in model.named_parameters()})
    for name in results[0]:
        assert rel(results[1][name], results[0][name]) < 1e-5, name


def test_lr_schedule_runs_on_host_without_retrace():
    nn.manual_seed(0)
    model = nn.GPT(nn.GPTConfig(**TINY))
    opt = nn.optim.AdamW(model.parameters(), lr=1e-3)
    opt.schedule = nn.optim.warmup_cosine(1e-3, warmup=2, total=6, min_lr=1e-4)

    @aj.compile
    def step(x, y):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    rng = np.random.default_rng(0)
    for _ in range(4):
        step(*batch(rng))
    (exe,) = [e for es in step.cache.values() for e in es]
    lrs = {h.name: v for k, v in exe.last_hparams.items()
           for h in [step.last_traced.hparams[k]]}
    assert lrs["lr/0"] == pytest.approx(opt.lr_at(4))
    assert [round(opt.lr_at(t), 6) for t in (1, 2, 6)] == [5e-4, 1e-3, 1e-4]
    assert step.traces == 1


def test_bad_tokens_and_long_sequences_fail_before_gpu_work():
    nn.manual_seed(0)
    model = nn.GPT(nn.GPTConfig(**TINY))

    @aj.compile
    def fwd(x, y):
        return model(x, y)[1]

    x, y = batch(np.random.default_rng(0))
    fwd(x, y)
    bad = x.copy()
    bad[1, 3] = 32
    with pytest.raises(aj.AlphaJitError, match=r"embedding: argument 0 .* index 32"):
        fwd(bad, y)
    long = np.zeros((1, 17), np.int32)
    with pytest.raises(aj.ShapeError, match=r"sequence length 17 exceeds block_size 16"):
        fwd(long, long)


def test_f16_overflow_skips_the_update_and_scales_down():
    nn.manual_seed(0)
    model = nn.GPT(nn.GPTConfig(**TINY))
    opt = nn.optim.AdamW(model.parameters(), lr=1e-2)

    @aj.compile(precision="f16", loss_scale={"init_scale": 1024.0, "growth_interval": 2})
    def step(x, y, k):
        loss = model(x, y)[1] * k  # k = 1e30 forces inf gradients
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    scaler = step.loss_scaler
    rng = np.random.default_rng(0)
    one = np.ones((), np.float32)
    step(*batch(rng), one)
    assert float(scaler.scale.numpy()) == 1024.0 and float(scaler.good_steps.numpy()) == 1.0
    w = {n: p.numpy() for n, p in model.named_parameters()}
    m = {k: s.numpy() for k, s in opt.m.items()}
    step(*batch(rng), np.asarray(1e30, np.float32))
    assert float(scaler.scale.numpy()) == 512.0  # halved
    assert float(scaler.good_steps.numpy()) == 0.0
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.numpy(), w[n])  # weights unchanged
    for k, s in opt.m.items():
        np.testing.assert_array_equal(s.numpy(), m[k])  # moments unchanged
    step(*batch(rng), one)
    step(*batch(rng), one)  # two clean steps: the scale grows again
    assert float(scaler.scale.numpy()) == 1024.0
    assert any((p.numpy() != w[n]).any() for n, p in model.named_parameters())
    assert step.traces == 1  # all of it decided on the GPU, no retrace


def test_gpt_dropout_follows_train_and_eval():
    """eval() turns every dropout off (embeddings, attention, MLP, residual): the logits equal
    those of the same weights with dropout 0; train() turns them back on (a retrace each)."""
    cfg = dict(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    nn.manual_seed(0)
    model = nn.GPT(nn.GPTConfig(**cfg, dropout=0.3))
    plain = nn.GPT(nn.GPTConfig(**cfg))
    plain.load_state_dict(model.state_dict())
    fwd = aj.compile(lambda x: model(x)[0])
    x = np.random.default_rng(0).integers(0, 32, (2, 8)).astype(np.int32)
    want = aj.compile(lambda x: plain(x)[0])(x).numpy()
    train_out = fwd(x).numpy()
    assert not np.allclose(train_out, want, atol=1e-4)
    model.eval()
    np.testing.assert_allclose(fwd(x).numpy(), want, rtol=1e-5, atol=1e-6)
    model.train()
    assert not np.allclose(fwd(x).numpy(), want, atol=1e-4)
    assert fwd.traces == 2  # one per mode; the third call found the first trace again
