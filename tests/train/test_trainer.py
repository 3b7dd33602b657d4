"""The GPT trainer end to end on a tiny model: loss falls, resume is bit-identical, sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alpha_jit.train.checkpoint import ConfigMismatchError, load_checkpoint
from alpha_jit.train.generate import PromptError, Sampler, load_model, pick, prepare_prompt
from alpha_jit.train.trainer import TrainConfig, train
from tests.train.tiny import TINY, tiny_config, write_corpus


@pytest.fixture()
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def cfg(tmp_path, corpus, **kw) -> TrainConfig:
    return tiny_config(tmp_path, corpus, **kw)


def test_train_writes_everything_and_resume_is_bit_identical(tmp_path, corpus):
    straight = train(cfg(tmp_path / "a", corpus))
    assert straight["steps"] == 12 and straight["last_loss"] < straight["first_loss"]
    for f in ("ckpt.safetensors", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "a" / "run" / f).exists()
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))

    train(cfg(tmp_path / "b", corpus, stop_at=6))  # preempted after 6 steps...
    resumed = train(cfg(tmp_path / "b", corpus, steps=12, resume=True))  # ...then continued
    assert resumed["last_loss"] == straight["last_loss"]
    assert resumed["val_loss"] == straight["val_loss"]
    a, _ = load_checkpoint(tmp_path / "a" / "run" / "ckpt.safetensors")
    b, _ = load_checkpoint(tmp_path / "b" / "run" / "ckpt.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_with_another_config_fails_before_any_work(tmp_path, corpus):
    train(cfg(tmp_path, corpus, steps=2))
    ckpt = tmp_path / "run" / "ckpt.safetensors"
    before = ckpt.read_bytes()
    other = dict(TINY, n_layer=2)
    with pytest.raises(ConfigMismatchError, match="n_layer: checkpoint 1, model 2"):
        train(cfg(tmp_path, corpus, steps=4, resume=True, model=other))
    assert ckpt.read_bytes() == before


def test_sampling_greedy_topk_and_prompt_errors(tmp_path, corpus):
    train(cfg(tmp_path, corpus, steps=4))
    model = load_model(tmp_path / "run" / "ckpt.safetensors")
    s = Sampler(model)
    a = s.generate(list(b"step "), 5, temperature=0.0)
    b = s.generate(list(b"step "), 5, temperature=0.0)
    assert a == b and len(a) == 5 and all(0 <= t < 256 for t in a)
    assert s.forward.traces == 1  # one window shape serves every prompt length
    with pytest.raises(PromptError, match="empty"):
        s.generate([], 3)
    with pytest.raises(PromptError, match="--truncate"):
        prepare_prompt(list(range(1, 40)), 16, truncate=False)
    assert prepare_prompt(list(range(1, 40)), 16, truncate=True) == list(range(25, 40))
    logits = np.array([0.0, 5.0, 1.0, 4.0])
    rng = np.random.default_rng(0)
    assert {pick(logits, 1.0, 2, rng) for _ in range(200)} == {1, 3}  # only the top 2
    assert pick(logits, 0.0, None, rng) == 1
