"""The torch.optim-shaped API against torch itself: every option of SGD, Adam and AdamW, param
groups, `state_dict()` / `load_state_dict()` (within alpha_jit and from torch), and gradient
clipping (`alpha_jit.nn.utils`).

Each case trains a two-layer linear model for three compiled steps and compares every parameter
after every step with torch.optim started from the same weights. A comparison alone would also
pass for an option that does nothing on this model, so every case also checks (on torch, which
costs no compile) that dropping the option moves the result far beyond the tolerance.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="optimizer parity tests need torch (pip install torch) as the reference")

import alpha_jit as aj  # noqa: E402
import alpha_jit.nn.utils as nn_utils  # noqa: E402
from alpha_jit import nn  # noqa: E402
from alpha_jit.nn.optim import OptimizerError  # noqa: E402

D_IN, HIDDEN, D_OUT, N = 4, 6, 3, 8
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6
FAR = 1e-4  # an option must move torch's result at least this much (tolerance is ~1e-5)


def _batches(seed: int = 0, n: int = STEPS) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((N, D_IN)).astype(np.float32),
             rng.standard_normal((N, D_OUT)).astype(np.float32)) for _ in range(n)]


DATA = _batches()


def _model(seed: int = 0) -> nn.Module:
    nn.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Linear(HIDDEN, D_OUT))


def _split(params: list, groups: list[dict] | None) -> list:
    """params, or two groups (first layer, second layer) with the given options."""
    if groups is None:
        return params
    return [{"params": params[:2], **groups[0]}, {"params": params[2:], **groups[1]}]


def _step(model: nn.Module, opt: nn.optim.Optimizer, clip=None) -> aj.CompiledFunction:
    @aj.compile
    def step(x, y):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        out = clip(model.parameters()) if clip is not None else None
        opt.step()
        opt.zero_grad()
        return loss if out is None else (loss, out)

    return step


def _torch_model(weights: list[np.ndarray]):
    m = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Linear(HIDDEN, D_OUT))
    with torch.no_grad():
        for tp, w in zip(m.parameters(), weights, strict=True):
            tp.copy_(torch.from_numpy(w))
    return m


def _torch_train(m, opt, data, clip=None) -> list[list[np.ndarray]]:
    """Parameters after each step (and the clip's return value, if any, is dropped)."""
    out = []
    for x, y in data:
        loss = ((m(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
        loss.backward()
        if clip is not None:
            clip(list(m.parameters()))
        opt.step()
        opt.zero_grad()
        out.append([p.detach().numpy().copy() for p in m.parameters()])
    return out


def _torch_run(weights, kind: str, options: dict, groups: list[dict] | None,
               data=DATA) -> list[list[np.ndarray]]:
    m = _torch_model(weights)
    opt = getattr(torch.optim, kind)(_split(list(m.parameters()), groups), **options)
    return _torch_train(m, opt, data)


def _assert_close(got: list[list[np.ndarray]], want: list[list[np.ndarray]], what: str):
    for t, (g_step, w_step) in enumerate(zip(got, want, strict=True)):
        for i, (g, w) in enumerate(zip(g_step, w_step, strict=True)):
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL,
                                       err_msg=f"{what}: parameter {i} after step {t + 1}")


def _distance(a: list[list[np.ndarray]], b: list[list[np.ndarray]]) -> float:
    return max(float(np.abs(x - y).max()) for sa, sb in zip(a, b, strict=True)
               for x, y in zip(sa, sb, strict=True))


# ---- every option, against torch -------------------------------------------------------------
# name: (optimizer, options, per-group options or None, the options without what is tested)
SGD_BASE = {"lr": 0.1, "momentum": 0.9}
ADAM_BASE = {"lr": 0.05}
CASES = {
    "sgd": ("SGD", {"lr": 0.1}, None, {"lr": 0.2}),
    "sgd-momentum": ("SGD", SGD_BASE, None, {"lr": 0.1}),
    "sgd-dampening": ("SGD", {**SGD_BASE, "dampening": 0.5}, None, SGD_BASE),
    "sgd-nesterov": ("SGD", {**SGD_BASE, "nesterov": True}, None, SGD_BASE),
    "sgd-weight_decay": ("SGD", {**SGD_BASE, "weight_decay": 0.3}, None, SGD_BASE),
    "sgd-maximize": ("SGD", {**SGD_BASE, "maximize": True}, None, SGD_BASE),
    "sgd-groups": ("SGD", {"lr": 0.1},
                   [{"momentum": 0.9, "nesterov": True, "lr": 0.05},
                    {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.2, "maximize": True}],
                   {"lr": 0.1}),
}
for _kind in ("Adam", "AdamW"):
    _k = _kind.lower()
    CASES |= {
        _k: (_kind, ADAM_BASE, None, {"lr": 0.1}),
        f"{_k}-betas": (_kind, {**ADAM_BASE, "betas": (0.5, 0.8)}, None, ADAM_BASE),
        f"{_k}-eps": (_kind, {**ADAM_BASE, "eps": 0.1}, None, ADAM_BASE),
        f"{_k}-weight_decay": (_kind, {**ADAM_BASE, "weight_decay": 0.5}, None,
                               {**ADAM_BASE, "weight_decay": 0.0}),
        # beta2 0.5: the second moment falls between steps, so its running max differs
        f"{_k}-amsgrad": (_kind, {**ADAM_BASE, "betas": (0.9, 0.5), "amsgrad": True}, None,
                          {**ADAM_BASE, "betas": (0.9, 0.5)}),
        f"{_k}-maximize": (_kind, {**ADAM_BASE, "maximize": True}, None, ADAM_BASE),
        f"{_k}-groups": (_kind, ADAM_BASE,
                         [{"betas": (0.8, 0.5), "amsgrad": True, "lr": 0.02},
                          {"eps": 0.1, "weight_decay": 0.3, "maximize": True}], ADAM_BASE),
    }
CASES["adam-decoupled_weight_decay"] = (
    "Adam", {**ADAM_BASE, "weight_decay": 0.5, "decoupled_weight_decay": True}, None,
    {**ADAM_BASE, "weight_decay": 0.5})


@pytest.mark.parametrize("name", list(CASES))
def test_three_steps_match_torch(name):
    kind, options, groups, without = CASES[name]
    model = _model()
    weights = [p.numpy() for p in model.parameters()]
    opt = getattr(nn.optim, kind)(_split(model.parameters(), groups), **options)
    step = _step(model, opt)
    got = []
    for x, y in DATA:
        step(x, y)
        got.append([p.numpy() for p in model.parameters()])
    want = _torch_run(weights, kind, options, groups)
    _assert_close(got, want, name)
    assert step.traces == 1 and opt.step_count == STEPS
    # the tested option (or the groups' options) must matter on this model
    other = _torch_run(weights, kind, without, None)
    assert _distance(want, other) > FAR, f"{name}: the option does not change the result"


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamW"])
def test_signature_and_default_groups_are_torchs(kind):
    ours, theirs = getattr(nn.optim, kind), getattr(torch.optim, kind)

    def shape(cls):
        return [(q.name, q.default, q.kind) for q in inspect.signature(cls).parameters.values()]

    assert shape(ours) == shape(theirs)
    p, tp = nn.Parameter(np.zeros(3, np.float32)), torch.nn.Parameter(torch.zeros(3))
    got, want = ours([p]).state_dict(), theirs([tp]).state_dict()
    assert list(got["param_groups"][0]) == list(want["param_groups"][0])
    assert got == want  # no state before the first step, every option with torch's default


def test_implementation_hints_are_accepted_and_differentiable_is_refused():
    p = nn.Parameter(np.zeros(3, np.float32))
    opt = nn.optim.AdamW([p], foreach=True, fused=True, capturable=True)
    assert opt.param_groups[0]["fused"] is True
    nn.optim.SGD([p], foreach=False, fused=None)
    with pytest.raises(OptimizerError, match="differentiable=True is not supported"):
        nn.optim.Adam([p], differentiable=True)
    with pytest.raises(OptimizerError, match=r"unsupported option.*'amsgrad'.*supported: "):
        nn.optim.SGD([{"params": [p], "amsgrad": True}])
    with pytest.raises(OptimizerError, match="maximize must be True or False"):
        nn.optim.SGD([p], maximize="yes")


# ---- state_dict ------------------------------------------------------------------------------
def _snapshot(model, opt) -> list[np.ndarray]:
    """Every parameter and every state tensor of the optimizer."""
    return [p.numpy() for p in model.parameters()] + [
        t.numpy() for per_p in opt.state.values() for t in per_p.values()]


ROUND_TRIP = {
    "sgd": ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}, None),
    "adam-amsgrad": ("Adam", {"lr": 0.05, "betas": (0.9, 0.5), "amsgrad": True,
                              "weight_decay": 0.1}, None),
    "adamw-groups": ("AdamW", {"lr": 0.05}, CASES["adamw-groups"][2]),
}


@pytest.mark.parametrize("name, compiled_before_load",
                         [(n, False) for n in ROUND_TRIP] + [("adam-amsgrad", True)])
def test_state_dict_round_trip_continues_training_exactly(name, compiled_before_load):
    kind, options, groups = ROUND_TRIP[name]
    data = _batches(1, 4)

    def build(seed):
        model = _model(seed)
        opt = getattr(nn.optim, kind)(_split(model.parameters(), groups), **options)
        opt.schedule = nn.optim.warmup_cosine(options["lr"], warmup=2, total=10)
        return model, opt, _step(model, opt)

    model, opt, step = build(0)
    for x, y in data[:2]:
        step(x, y)
    saved_weights = [p.numpy() for p in model.parameters()]
    saved = opt.state_dict()
    step(*data[2])
    want = _snapshot(model, opt)

    adam, amsgrad = {"step", "exp_avg", "exp_avg_sq"}, {"max_exp_avg_sq"}
    keys = {"sgd": [{"step", "momentum_buffer"}] * 4, "adam-amsgrad": [adam | amsgrad] * 4,
            "adamw-groups": [adam | amsgrad] * 2 + [adam] * 2}[name]  # amsgrad: group 0 only
    assert set(saved) == {"state", "param_groups"}
    assert [set(saved["state"][i]) for i in range(4)] == keys
    assert all(s["step"] == 2.0 for s in saved["state"].values())
    assert [g["params"] for g in saved["param_groups"]] == (
        [[0, 1, 2, 3]] if groups is None else [[0, 1], [2, 3]])

    fresh, fresh_opt, fresh_step = build(1)  # different initial weights
    if compiled_before_load:
        fresh_step(*data[3])  # the state tensors are device-resident now
    for p, w in zip(fresh.parameters(), saved_weights, strict=True):
        p.assign(w)
    fresh_opt.load_state_dict(saved)
    assert fresh_opt.step_count == 2
    fresh_step(*data[2])
    got = _snapshot(fresh, fresh_opt)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(g, w, err_msg=f"tensor {i}")
    assert fresh_opt.step_count == 3


TORCH_LOAD = {
    # dampening applies only after the first step: loading must not restart the count
    "sgd": ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, None),
    "adam-amsgrad": ("Adam", {"lr": 0.05, "betas": (0.9, 0.5), "amsgrad": True}, None),
    "adamw-groups": ("AdamW", {"lr": 0.05}, CASES["adamw-groups"][2]),
}


def _to_numpy(sd):
    """torch's state dict with every tensor converted by `.numpy()`."""
    return {"state": {i: {k: v.numpy() for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}


@pytest.mark.parametrize("name, as_numpy", [(n, True) for n in TORCH_LOAD] + [("sgd", False)])
def test_loading_torchs_state_dict_continues_like_torch(name, as_numpy):
    kind, options, groups = TORCH_LOAD[name]
    data = _batches(2)
    model = _model(3)
    weights = [p.numpy() for p in model.parameters()]
    tm = _torch_model(weights)
    t_opt = getattr(torch.optim, kind)(_split(list(tm.parameters()), groups), **options)
    _torch_train(tm, t_opt, data[:2])
    sd = t_opt.state_dict()

    for p, tp in zip(model.parameters(), tm.parameters(), strict=True):
        p.assign(tp.detach().numpy())
    opt = getattr(nn.optim, kind)(_split(model.parameters(), groups), **options)
    opt.load_state_dict(_to_numpy(sd) if as_numpy else sd)
    assert opt.step_count == (1 if kind == "SGD" else 2)
    key = "momentum_buffer" if kind == "SGD" else "exp_avg_sq"
    np.testing.assert_array_equal(opt.state[model.parameters()[2]][key].numpy(),
                                  t_opt.state[list(tm.parameters())[2]][key].numpy())
    step = _step(model, opt)
    step(*data[2])
    want = _torch_train(tm, t_opt, data[2:])
    _assert_close([[p.numpy() for p in model.parameters()]], want, name)


def test_loading_a_state_dict_after_compiling_retraces_with_its_options():
    """A load replaces options and per-parameter steps the compiled step baked in: the next
    call retraces (editing an option in place, without a load, still raises)."""
    model = _model()
    opt = nn.optim.Adam(model.parameters(), lr=0.05)
    step = _step(model, opt)
    step(*DATA[0])
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.01
    sd["param_groups"][0]["foreach"] = False  # a hint
    opt.load_state_dict(sd)
    step(*DATA[1])
    sd = opt.state_dict()
    sd["param_groups"][0]["betas"] = (0.5, 0.9)
    opt.load_state_dict(sd)
    step(*DATA[2])
    assert step.traces == 3
    assert opt.param_groups[0]["betas"] == (0.5, 0.9)
    opt.param_groups[0]["betas"] = (0.1, 0.2)
    with pytest.raises(OptimizerError, match="'betas' changed"):
        step(*DATA[0])


def _adam_state(amsgrad: bool = False, step: float = 2.0) -> dict:
    p = [nn.Parameter(np.ones((2, 3), np.float32)), nn.Parameter(np.ones(3, np.float32))]
    opt = nn.optim.Adam(p, amsgrad=amsgrad)
    sd = {"state": {i: {"step": step, "exp_avg": np.full(q.shape, 0.5, np.float32),
                        "exp_avg_sq": np.full(q.shape, 0.25, np.float32)}
                    for i, q in enumerate(p)},
          "param_groups": [{**opt.param_groups[0], "params": [0, 1]}]}
    return opt, sd


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "2 parameter groups"),
    (lambda sd: sd["param_groups"][0]["params"].pop(), "has 1 parameters in the state dict"),
    (lambda sd: sd["state"][0].update(exp_avg=np.zeros(6, np.float32)), "has shape"),
    (lambda sd: sd["state"][0].update(velocity=np.zeros(3)), "unknown entry 'velocity'"),
    (lambda sd: sd["param_groups"][0].update(amsgrad=True), r"lacks \['max_exp_avg_sq'\]"),
    (lambda sd: sd["param_groups"][0].update(momentum=0.9), r"unsupported option.*momentum"),
    (lambda sd: sd["param_groups"][0].update(betas=(0.9, 1.0)), "betas must lie"),
    (lambda sd: sd["state"].update({5: {}}), "state for parameter 5"),
])
def test_bad_state_dicts_are_rejected_and_change_nothing(edit, match):
    opt, sd = _adam_state()
    before = [t.numpy() for per_p in opt.state.values() for t in per_p.values()]
    edit(sd)
    with pytest.raises(OptimizerError, match=match):
        opt.load_state_dict(sd)
    assert opt.step_count == 0 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    after = [t.numpy() for per_p in opt.state.values() for t in per_p.values()]
    assert all(np.array_equal(a, b) for a, b in zip(after, before, strict=True))


def test_load_accepts_json_shaped_dicts_and_torch_bookkeeping():
    opt, sd = _adam_state()
    sd["state"] = {str(k): v for k, v in sd["state"].items()}  # JSON keys are strings
    sd["param_groups"][0] |= {"betas": [0.8, 0.9], "initial_lr": 1e-3}  # lists; a scheduler's
    del sd["param_groups"][0]["decoupled_weight_decay"]  # an older torch's group
    opt.load_state_dict(sd)
    assert opt.step_count == 2 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert "initial_lr" not in opt.param_groups[0]
    np.testing.assert_array_equal(opt.state[opt.params[1]]["exp_avg"].numpy(),
                                  np.full(3, 0.5, np.float32))
    sd["state"] = {}
    opt.load_state_dict(sd)  # no state: back to zeros, step 0
    assert opt.step_count == 0 and not opt.state[opt.params[0]]["exp_avg"].numpy().any()


# ---- clipping --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_type, single", [(math.inf, False), ("inf", True), (2.0, True)])
def test_clip_grad_norm_matches_torch(norm_type, single):
    max_norm = 0.05
    model = _model()
    weights = [p.numpy() for p in model.parameters()]
    opt = nn.optim.SGD(model.parameters(), lr=1.0)

    def pick(params):
        return params[2] if single else params

    step = _step(model, opt, lambda ps: nn_utils.clip_grad_norm_(pick(ps), max_norm,
                                                                 norm_type=norm_type))
    tm = _torch_model(weights)
    t_opt = torch.optim.SGD(tm.parameters(), lr=1.0)
    norms = []
    want = _torch_train(tm, t_opt, DATA[:1], lambda ps: norms.append(
        torch.nn.utils.clip_grad_norm_(pick(ps), max_norm, norm_type=norm_type).item()))
    _, norm = step(*DATA[0])
    assert norms[0] > 2 * max_norm  # the clip is active
    assert float(norm) == pytest.approx(norms[0], rel=1e-6)
    _assert_close([[p.numpy() for p in model.parameters()]], want, f"clip {norm_type}")


def test_clip_grad_value_matches_torch():
    clip = 0.02
    model = _model()
    weights = [p.numpy() for p in model.parameters()]
    opt = nn.optim.SGD(model.parameters(), lr=1.0)
    step = _step(model, opt, lambda ps: nn_utils.clip_grad_value_(ps, clip))
    tm = _torch_model(weights)
    largest = []

    def torch_clip(ps):
        largest.append(max(float(p.grad.abs().max()) for p in ps))
        torch.nn.utils.clip_grad_value_(ps, clip)

    want = _torch_train(tm, torch.optim.SGD(tm.parameters(), lr=1.0), DATA[:1], torch_clip)
    step(*DATA[0])
    assert largest[0] > 2 * clip  # the clip is active
    _assert_close([[p.numpy() for p in model.parameters()]], want, "clip_grad_value_")


@pytest.mark.parametrize("clip, match", [
    (lambda ps: nn_utils.clip_grad_norm_(ps, 1.0, norm_type=1), "norm_type 1 is not supported"),
    (lambda ps: nn_utils.clip_grad_norm_(ps, 1.0, error_if_nonfinite=True),
     r"cannot raise inside a compiled step.*math.isfinite\(float\(norm\)\)"),
    (lambda ps: nn_utils.clip_grad_value_(ps, -1.0), "clip_value must be a number >= 0"),
    (lambda ps: nn_utils.clip_grad_norm_([np.zeros(3)], 1.0), "takes Parameters"),
])
def test_clipping_errors_are_clear(clip, match):
    model = _model()
    step = _step(model, nn.optim.SGD(model.parameters()), clip)
    with pytest.raises(aj.AlphaJitError, match=match):
        step(*DATA[0])


def test_clip_grad_norm_keeps_its_old_names():
    assert nn.optim.clip_grad_norm_ is nn_utils.clip_grad_norm_
    assert nn.clip_grad_norm_ is nn_utils.clip_grad_norm_


@pytest.mark.parametrize("kind,options", [("AdamW", {"lr": 0.05}),
                                          ("SGD", {"lr": 0.05, "momentum": 0.9,
                                                   "dampening": 0.5})])
def test_a_parameter_unfrozen_later_counts_its_own_steps(kind, options):
    """PyTorch keeps a step per parameter: one that starts training at step 3 gets the bias
    correction (Adam) or undamped first step (SGD) of its own first update."""
    model = _model()
    weights = [p.numpy() for p in model.parameters()]
    first = list(model.parameters())[:2]
    for p in first:
        p.requires_grad_(False)
    opt = getattr(nn.optim, kind)(model.parameters(), **options)
    step = _step(model, opt)
    data = _batches(n=5)
    got = []
    for t, (x, y) in enumerate(data):
        if t == 2:
            for p in first:
                p.requires_grad_(True)  # the step retraces, now updating them
        step(x, y)
        got.append([p.numpy() for p in model.parameters()])

    m = _torch_model(weights)
    tp = list(m.parameters())
    for p in tp[:2]:
        p.requires_grad_(False)
    t_opt = getattr(torch.optim, kind)(tp, **options)
    want = []
    for t, (x, y) in enumerate(data):
        if t == 2:
            for p in tp[:2]:
                p.requires_grad_(True)
        want += _torch_train(m, t_opt, [(x, y)])
    _assert_close(got, want, f"{kind} unfrozen at step 3")
    sd = opt.state_dict()["state"]
    assert [sd[i]["step"] for i in range(4)] == [3.0, 3.0, 5.0, 5.0]


def test_a_parameter_frozen_from_the_start_has_no_state_and_round_trips():
    model = _model()
    first = list(model.parameters())[:2]
    for p in first:
        p.requires_grad_(False)
    opt = nn.optim.AdamW(model.parameters(), lr=0.05)
    step = _step(model, opt)
    for x, y in DATA[:2]:
        step(x, y)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [2, 3]  # torch keeps nothing for never-updated parameters
    fresh_model = _model()
    fresh_model.load_state_dict(model.state_dict())
    fresh = nn.optim.AdamW(fresh_model.parameters(), lr=0.05)
    fresh.load_state_dict(sd)
    assert [fresh.param_step(p) for p in fresh.params] == [0, 0, 2, 2]
