"""PyTorch-shaped modules: a torch model definition ports by changing its imports.

The same class source is built once with `torch.nn` and once with `alpha_jit.nn`; the two
trees must agree on state_dict names, reprs and (after loading torch's weights) the forward
values of a compiled step. Also: train()/eval() retraces compiled steps that read
`training`, requires_grad_ freezes, zero_grad, buffers, and the containers' list/dict API.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import alpha_jit as aj
from alpha_jit import nn
from alpha_jit.nn import functional as F
from tests.e2e.util import classifier_step

torch = pytest.importorskip("torch")
tnn = torch.nn


def make_net(nn_, buffer):
    """A model written once against either `nn` module; `buffer(array)` makes a buffer
    value in that library's tensor type."""

    class Net(nn_.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn_.Embedding(10, 8)
            self.body = nn_.Sequential(nn_.Linear(8, 16), nn_.LayerNorm(16), nn_.GELU(),
                                       nn_.Linear(16, 8))
            self.blocks = nn_.ModuleList([nn_.Linear(8, 8) for _ in range(2)])
            self.heads = nn_.ModuleDict({"a": nn_.Linear(8, 4),
                                         "b": nn_.Linear(8, 4, bias=False)})
            self.norm = nn_.RMSNorm(8)
            self.plain = nn_.LayerNorm(8, elementwise_affine=False)
            self.drop = nn_.Dropout(0.25)
            self.out = nn_.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight  # tied: listed under both names
            self.register_buffer("scale", buffer(np.linspace(0.5, 2.0, 4, dtype=np.float32)))
            self.register_buffer("mask", buffer(np.ones(3, np.float32)), persistent=False)

        def forward(self, ids):
            h = self.body(self.emb(ids))
            for blk in self.blocks:
                h = h + blk(h).tanh()
            h = self.drop(self.plain(self.norm(h)))
            return self.heads["a"](h) * self.scale + self.heads["b"](h), self.out(h)

    return Net()


def torch_net():
    torch.manual_seed(0)
    return make_net(tnn, torch.from_numpy)


def alpha_net():
    nn.manual_seed(1)
    return make_net(nn, lambda a: a)


IDS = np.array([[1, 4, 9], [0, 2, 7]], np.int32)


def test_state_dict_names_and_order_match_torch():
    t, a = torch_net(), alpha_net()
    assert list(a.state_dict()) == list(t.state_dict())
    assert "out.weight" in a.state_dict() and "emb.weight" in a.state_dict()  # tied: both
    assert "mask" not in a.state_dict()  # non-persistent
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in a.named_buffers()] == [n for n, _ in t.named_buffers()]
    assert [n for n, _ in a.named_modules()] == [n for n, _ in t.named_modules()]
    assert [n for n, _ in a.named_children()] == [n for n, _ in t.named_children()]
    assert len(a.parameters()) == len(list(t.parameters()))
    assert len(a.parameters(recurse=False)) == 0
    sd = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert sd["body.1.weight"].shape == (16,) and sd["scale"][0] == 0.5
    assert list(a.state_dict(prefix="model."))[:2] == ["model.scale", "model.emb.weight"]
    assert a.state_dict(keep_vars=True)["emb.weight"] is a.emb.weight


def test_load_torch_weights_then_compiled_forward_matches_torch():
    t, a = torch_net(), alpha_net()
    t.eval()
    a.eval()
    result = a.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert repr(result) == "<All keys matched successfully>"

    @aj.compile
    def f(ids):
        return a(ids)

    got_heads, got_logits = f(IDS)
    with torch.no_grad():
        want_heads, want_logits = t(torch.from_numpy(IDS.astype(np.int64)))
    np.testing.assert_allclose(got_heads.numpy(), want_heads.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_logits.numpy(), want_logits.numpy(), rtol=1e-5, atol=1e-5)
    for k, v in t.state_dict().items():  # round trip: what we loaded is what we hold
        np.testing.assert_array_equal(a.state_dict()[k], v.numpy())


def test_load_state_dict_takes_torch_tensors_and_casts():
    t, a = torch_net(), alpha_net()
    a.load_state_dict(t.state_dict())  # tensors as they are, no .numpy()
    np.testing.assert_array_equal(a.body[0].weight.numpy(), t.body[0].weight.detach().numpy())
    lin = nn.Linear(3, 2)
    w64 = np.arange(6, dtype=np.float64).reshape(2, 3)
    lin.load_state_dict({"weight": w64, "bias": torch.ones(2, dtype=torch.bfloat16)})
    assert lin.weight.numpy().dtype == np.float32
    np.testing.assert_array_equal(lin.weight.numpy(), w64.astype(np.float32))
    np.testing.assert_array_equal(lin.bias.numpy(), np.ones(2, np.float32))


def test_load_state_dict_strict_errors_and_shape_mismatch():
    a = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    good = a.state_dict()
    partial = {k: v for k, v in good.items() if k != "0.bias"}
    partial["extra.weight"] = np.zeros(2, np.float32)
    before = a[0].weight.numpy()
    with pytest.raises(nn.StateDictError) as err:
        a.load_state_dict({**partial, "0.weight": np.ones((3, 4), np.float32)})
    msg = str(err.value)
    assert 'Missing key(s) in state_dict: "0.bias"' in msg
    assert 'Unexpected key(s) in state_dict: "extra.weight"' in msg
    assert isinstance(err.value, aj.AlphaJitError) and isinstance(err.value, RuntimeError)
    np.testing.assert_array_equal(a[0].weight.numpy(), before)  # nothing written on failure

    res = a.load_state_dict(partial, strict=False)
    assert res.missing_keys == ["0.bias"] and res.unexpected_keys == ["extra.weight"]

    bad = {**good, "2.weight": np.zeros((2, 4), np.float32)}
    for strict in (True, False):  # a wrong shape is an error either way (as PyTorch)
        with pytest.raises(nn.StateDictError, match=r"size mismatch for 2\.weight: .*"
                           r"\(2, 4\).*\(2, 3\)"):
            a.load_state_dict(bad, strict=strict)


def test_repr_matches_torch():
    def build(nn_):
        return [
            nn_.Linear(4, 8),
            nn_.Linear(4, 8, bias=False),
            nn_.Sequential(nn_.Linear(2, 3), nn_.ReLU(), nn_.Dropout(0.1), nn_.GELU(),
                           nn_.GELU(approximate="tanh"), nn_.SiLU(), nn_.Tanh(),
                           nn_.Sigmoid(), nn_.Softmax(dim=-1), nn_.Flatten(), nn_.Identity()),
            nn_.ModuleList([nn_.Linear(3, 3) for _ in range(3)] + [nn_.ReLU()]),
            nn_.ModuleDict({"ln": nn_.LayerNorm(5, bias=False), "rms": nn_.RMSNorm(5),
                            "rms6": nn_.RMSNorm(5, eps=1e-6),
                            "plain": nn_.LayerNorm(5, elementwise_affine=False)}),
            nn_.Embedding(11, 6),
            nn_.Sequential(OrderedDict(inner=nn_.Sequential(nn_.Linear(1, 1)))),
            nn_.ModuleList(),
        ]

    for mine, theirs in zip(build(nn), build(tnn), strict=True):
        assert repr(mine) == repr(theirs)
    assert repr(make_net(nn, lambda a: a)) == repr(torch_net())


def test_eval_retraces_and_dropout_is_identity():
    nn.manual_seed(0)
    lin, drop = nn.Linear(16, 32), nn.Dropout(0.5)
    model = nn.Sequential(lin, drop)
    assert model.training and drop.training

    @aj.compile
    def f(x):
        return model(x)

    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    dense = x @ lin.weight.numpy().T + lin.bias.numpy()
    trained = f(x).numpy()
    assert (trained == 0).mean() > 0.2  # about half dropped...
    kept = trained != 0
    np.testing.assert_allclose(trained[kept], 2 * dense[kept], rtol=1e-5, atol=1e-6)  # 1/(1-p)
    assert model.eval() is model and not drop.training and not model.training
    np.testing.assert_allclose(f(x).numpy(), dense, rtol=1e-5, atol=1e-6)
    assert f.traces == 2  # the flag changed: retraced, not silently kept
    model.train()
    assert drop.training
    assert (f(x).numpy() == 0).mean() > 0.2
    assert f.traces == 2  # the training-mode step is still cached


def test_functional_dropout_with_self_training_retraces():
    class Net(nn.Module):  # the functional pattern: F.dropout(x, p, training=self.training)
        def forward(self, x):
            return F.dropout(x, 0.5, training=self.training)

    net = Net()

    @aj.compile
    def f(x):
        return net(x)

    x = np.ones((64,), np.float32)
    assert (f(x).numpy() == 0).any()
    net.eval()
    np.testing.assert_array_equal(f(x).numpy(), x)
    assert f.traces == 2


def _frozen_step():
    nn.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = nn.optim.AdamW(model.parameters(), lr=1e-2)
    return model, classifier_step(model, opt)


def test_requires_grad_freezes_and_unfreezing_retraces():
    model, step = _frozen_step()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 4)).astype(np.float32), rng.integers(0, 3, 16, np.int32)
    assert model[0].requires_grad_(False) is model[0]
    assert not any(p.requires_grad for p in model[0].parameters())
    w0, w2 = model[0].weight.numpy(), model[2].weight.numpy()
    step(x, y)
    np.testing.assert_array_equal(model[0].weight.numpy(), w0)  # frozen: AdamW skipped it
    assert np.abs(model[2].weight.numpy() - w2).max() > 0  # the rest trained
    model.requires_grad_()
    step(x, y)
    assert step.traces == 2
    assert np.abs(model[0].weight.numpy() - w0).max() > 0
    p = nn.Parameter(np.zeros(2, np.float32), requires_grad=False)
    assert not p.requires_grad and p.requires_grad_() is p and p.requires_grad


def test_zero_grad_inside_and_outside_a_step():
    nn.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 2))

    @aj.compile
    def grads(x):
        loss = model(x).sum()
        loss.backward()
        return loss

    @aj.compile
    def grads_then_clear(x):
        loss = model(x).sum()
        loss.backward()
        model.zero_grad()
        return loss

    x = np.ones((4, 3), np.float32)
    grads(x)
    np.testing.assert_allclose(model[0].bias.grad.numpy(), [4.0, 4.0])
    model.zero_grad(set_to_none=False)  # kept, as zeros
    np.testing.assert_array_equal(model[0].bias.grad.numpy(), [0.0, 0.0])
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    grads_then_clear(x)
    assert all(p.grad is None for p in model.parameters())


def test_sequential_indexing_like_torch():
    def build(nn_):
        return nn_.Sequential(nn_.Linear(2, 3), nn_.ReLU(), nn_.Linear(3, 4), nn_.Linear(4, 5))

    a, t = build(nn), build(tnn)
    assert len(a) == 4 and isinstance(a[1], nn.ReLU) and a[-1] is a[3]
    assert [type(m).__name__ for m in a] == ["Linear", "ReLU", "Linear", "Linear"]
    tail = a[1:]
    assert isinstance(tail, nn.Sequential) and tail[0] is a[1]
    assert list(tail.state_dict()) == list(t[1:].state_dict())  # keys kept: "2.weight"
    with pytest.raises(IndexError):
        a[4]
    for s in (a, t):
        s.append(s[0].__class__(5, 1))
        s.insert(1, s[1].__class__())
        del s[0]
    assert list(a.state_dict()) == list(t.state_dict())
    assert repr(a) == repr(t)
    named = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 2)), ("act", nn.ReLU())]))
    assert list(named.state_dict()) == ["fc.weight", "fc.bias"] and named[0] is named.fc


def test_module_list_and_dict_api():
    blocks = nn.ModuleList([nn.Linear(2, 2)])
    blocks.append(nn.ReLU())
    blocks.extend([nn.Linear(2, 2)])
    blocks += [nn.Tanh()]
    blocks.insert(0, nn.Identity())
    assert [type(m).__name__ for m in blocks] == ["Identity", "Linear", "ReLU", "Linear",
                                                  "Tanh"]
    assert len(blocks) == 5 and blocks[-1] is blocks[4] and isinstance(blocks[1:3],
                                                                       nn.ModuleList)
    assert [n for n, _ in blocks.named_parameters()] == ["1.weight", "1.bias", "3.weight",
                                                         "3.bias"]
    assert blocks[3].weight.state_name == "3.weight"  # a slice is a view: nothing renamed
    heads = nn.ModuleDict({"a": nn.Linear(2, 1)})
    heads.update([("b", nn.Linear(2, 3))])
    heads["c"] = nn.ReLU()
    assert "b" in heads and "z" not in heads and len(heads) == 3
    assert list(heads.keys()) == ["a", "b", "c"] and list(heads) == ["a", "b", "c"]
    assert [k for k, _ in heads.items()] == ["a", "b", "c"] and heads["a"] is heads.a
    assert [n for n, _ in heads.named_parameters()] == ["a.weight", "a.bias", "b.weight",
                                                        "b.bias"]
    with pytest.raises(TypeError):
        blocks.append(np.zeros(2))


def test_modules_in_containers_record_their_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).relu()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(2)])
            self.heads = nn.ModuleDict({"cls": nn.Linear(4, 2)})

        def forward(self, x):
            for blk in self.blocks:
                x = blk(x)
            return self.heads["cls"](x)

    net = Net()
    assert net.blocks[1].fc.weight.state_name == "blocks.1.fc.weight"  # errors and dumps

    @aj.compile
    def f(x):
        return net(x)

    graph = f.trace(np.ones((2, 4), np.float32)).snapshots[0][1]
    paths = {graph.prov(n).module for n in graph.topo()}
    assert {"blocks.0.fc", "blocks.1.fc", "heads.cls"} <= paths


def test_buffers_persist_and_steps_can_write_them():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", np.zeros((), np.float32))
            self.register_buffer("table", np.arange(3, dtype=np.float32), persistent=False)

        def forward(self, x):
            self.count = self.count + 1.0  # a state write, like PyTorch's buffer update
            return x * self.table

    c = Counter()
    assert [n for n, _ in c.named_buffers()] == ["count", "table"]
    assert list(c.state_dict()) == ["count"]

    @aj.compile
    def f(x):
        return c(x)

    for _ in range(3):
        out = f(np.ones(3, np.float32))
    np.testing.assert_array_equal(out.numpy(), [0.0, 1.0, 2.0])
    assert float(c.count.numpy()) == 3.0
    c.load_state_dict({"count": np.array(10.0)})
    f(np.ones(3, np.float32))
    assert float(c.count.numpy()) == 11.0


def test_traversal_train_flags_and_apply():
    net = alpha_net()
    seen = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen[-1] == "Net" and seen.count("Linear") == 7  # children first, then self
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    assert list(net.children())[1] is net.body and net.get_submodule("body.0") is net.body[0]
    with pytest.raises(ValueError, match="boolean"):
        net.train("no")


def test_unsupported_options_and_misuse_raise_clearly():
    with pytest.raises(nn.UnsupportedOptionError, match="reshape"):
        nn.LayerNorm((4, 8))
    with pytest.raises(nn.UnsupportedOptionError, match="max_norm"):
        nn.Embedding(10, 4, max_norm=1.0)
    assert nn.LayerNorm((6,)).weight.shape == (6,) and nn.Embedding(3, 2).padding_idx is None
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="parameter 'weight'"):
        lin.weight = np.zeros((2, 2), np.float32)

    class Early(nn.Module):
        def __init__(self):
            self.fc = nn.Linear(1, 1)  # before super().__init__()

    with pytest.raises(AttributeError, match="before Module.__init__"):
        Early()
    assert nn.Linear(2, 2, device="cuda", dtype=torch.float32).weight.dtype == aj.float32
    with pytest.raises(nn.UnsupportedOptionError, match="precision"):
        nn.Linear(2, 2, dtype=torch.float16)
    frozen = nn.Embedding.from_pretrained(np.eye(3, dtype=np.float32))
    assert not frozen.weight.requires_grad and frozen.weight.shape == (3, 3)


def test_embedding_padding_idx_row_is_zero_and_gets_no_gradient():
    nn.manual_seed(0)
    emb = nn.Embedding(6, 3, padding_idx=-1)  # PyTorch normalises -1 to 5
    assert emb.padding_idx == 5 and repr(emb) == "Embedding(6, 3, padding_idx=5)"
    np.testing.assert_array_equal(emb.weight.numpy()[5], 0.0)
    emb.weight.assign(np.arange(18, dtype=np.float32).reshape(6, 3))
    opt = nn.optim.SGD(emb.parameters(), lr=1.0)

    @aj.compile
    def step(ids):
        out = emb(ids)
        loss = (out * out).sum()
        loss.backward()
        opt.step()
        return out

    ids = np.array([5, 1, 5], np.int32)
    out = step(ids).numpy()
    w0 = np.arange(18, dtype=np.float32).reshape(6, 3)
    np.testing.assert_array_equal(out, w0[ids])  # the padding row's values are still read
    want = w0.copy()
    want[1] -= 2 * w0[1]
    np.testing.assert_array_equal(emb.weight.numpy(), want)  # row 5 untouched
