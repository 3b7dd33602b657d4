"""`aj.compile(memory_budget=...)`: over budget, norm and GELU outputs are recomputed in backward
(the planned peak falls, the results do not change); a budget no recompute can meet fails
before anything is built, naming the budget."""

from __future__ import annotations

import numpy as np
import pytest

from alpha_jit import nn
from alpha_jit.runtime.device import get_device
from alpha_jit.runtime.step_plan import MemoryPlanError, plan_step
from tests.e2e.util import lm_step

CFG = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)


def _model_and_batch():
    nn.manual_seed(7)
    model = nn.GPT(nn.GPTConfig(**CFG))
    rng = np.random.default_rng(7)
    x = rng.integers(0, 64, (8, 32)).astype(np.int32)
    return model, x, np.roll(x, -1, axis=1)


def _run(budget):
    model, x, y = _model_and_batch()
    opt = nn.optim.AdamW(model.parameters(), lr=1e-3)
    step = lm_step(model, opt)
    if budget is not None:
        step.memory_budget = budget
    loss = float(step(x, y))
    plan = plan_step(step.trace(x, y).graph, get_device().caps, progress=False,
                     memory_budget=budget)
    return loss, [p.numpy() for p in model.parameters()], plan


def test_over_budget_recomputes_and_keeps_results():
    loss, params, plan = _run(None)
    assert plan.recompute == ""
    budget = plan.peak_bytes - 1
    loss_b, params_b, plan_b = _run(budget)
    assert plan_b.recompute.startswith("recomputed") and plan_b.peak_bytes <= budget
    assert loss_b == pytest.approx(loss, rel=1e-6)
    for a, b in zip(params, params_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_budget_nothing_meets_fails_before_building():
    model, x, y = _model_and_batch()
    step = lm_step(model, nn.optim.AdamW(model.parameters(), lr=1e-3))
    step.memory_budget = 1 << 20
    with pytest.raises(MemoryPlanError, match="memory_budget"):
        step(x, y)


def test_memory_budget_must_be_a_positive_int():
    import alpha_jit as aj
    from alpha_jit.errors import AlphaJitError

    for bad in (-5, 0, 1.5, True):
        with pytest.raises(AlphaJitError, match="memory_budget"):
            aj.compile(lambda x: x, memory_budget=bad)
