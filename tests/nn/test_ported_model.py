"""A model written for PyTorch, ported by changing its imports alone, trains like PyTorch.

`MODEL` is PyTorch source (a small ViT with an MLP-Mixer token-mixing layer: patches by
reshape/permute/flatten, a class token by `torch.cat` of an expanded parameter, attention by
`chunk` + `view` + `transpose` + `F.scaled_dot_product_attention`, `nn.Sequential`,
`nn.ModuleList`, LayerNorm, GELU, Dropout). It is executed twice: once after
`import torch; from torch import nn, optim`, once after the alpha_jit imports. The alpha_jit
model loads the PyTorch model's `state_dict()` (numpy via `.numpy()`), and two training steps
(AdamW, gradient clipping) must agree on the losses and on every updated parameter.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference is PyTorch running the same source")

TORCH_IMPORTS = """
import torch
from torch import nn, optim
import torch.nn.functional as F
"""
ALPHA_IMPORTS = """
import alpha_jit as torch
from alpha_jit import nn
from alpha_jit.nn import optim
from alpha_jit.nn import functional as F
"""

MODEL = '''
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        # no bias, for the same reason as TokenMixing.fc: softmax cancels the key bias
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, N, self.heads, C // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, ratio=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * ratio), nn.GELU(), nn.Dropout(0.1),
                                 nn.Linear(dim * ratio, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenMixing(nn.Module):
    def __init__(self, tokens, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        # no bias: a per-token constant is removed by the next LayerNorm, so its gradient is
        # exactly 0 and Adam (m / sqrt(v)) would turn each library's round-off into a full step
        self.fc = nn.Linear(tokens, tokens, bias=False)

    def forward(self, x):
        return x + self.fc(self.norm(x).transpose(1, 2)).transpose(1, 2)


class TinyViT(nn.Module):
    def __init__(self, img=8, patch=4, dim=32, depth=2, heads=4, classes=5):
        super().__init__()
        self.patch = patch
        tokens = (img // patch) ** 2 + 1
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.mix = TokenMixing(tokens, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, img):
        B, C, H, W = img.shape
        p = self.patch
        x = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        x = self.embed(x.flatten(3).flatten(1, 2))
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1) + self.pos
        x = self.mix(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def train_step(model, opt, img, labels):
    loss = F.cross_entropy(model(img), labels)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return loss
'''


def _load(imports: str) -> dict:
    env: dict = {}
    exec(compile(imports + MODEL, "<ported model>", "exec"), env)  # noqa: S102
    return env


def test_a_pytorch_model_ported_by_its_imports_trains_like_pytorch():
    import alpha_jit as aj

    tm, am = _load(TORCH_IMPORTS), _load(ALPHA_IMPORTS)
    torch.manual_seed(0)
    ref = tm["TinyViT"]()
    model = am["TinyViT"]()
    assert list(model.state_dict()) == list(ref.state_dict())
    missing = model.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    assert missing.missing_keys == [] and missing.unexpected_keys == []
    # dropout masks cannot match across libraries: train in eval mode on both sides
    ref.eval()
    model.eval()
    t_opt = tm["optim"].AdamW(ref.parameters(), lr=3e-3, weight_decay=0.05)
    a_opt = am["optim"].AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    step = aj.compile(lambda img, y: am["train_step"](model, a_opt, img, y))

    rng = np.random.default_rng(1)
    for _ in range(2):
        img = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
        y = rng.integers(0, 5, 6).astype(np.int32)
        want = float(tm["train_step"](ref, t_opt, torch.from_numpy(img),
                                      torch.from_numpy(y).long()))
        got = float(step(img, y))
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (got, want)
    ref_sd = ref.state_dict()
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value, ref_sd[name].numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    # the updated weights moved: the comparison above is not of two untouched copies
    assert not np.allclose(model.state_dict()["head.weight"],
                           tm["TinyViT"]().state_dict()["head.weight"].numpy())
