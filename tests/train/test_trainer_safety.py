"""The trainer never loses good work: NaN never replaces a checkpoint, a signal checkpoints and
stops cleanly, a resume cleans up after a killed run, bad options fail before any work, and
throughput leaves out the compiling first step."""

from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import pytest

from alpha_jit.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from alpha_jit.train.config import TrainConfigError
from alpha_jit.train.generate import load_model
from alpha_jit.train.metrics import read_metrics
from alpha_jit.train.trainer import Trainer, train
from tests.train.tiny import tiny_config, write_corpus


@pytest.fixture()
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def _poison(trainer: Trainer) -> str:
    """Put NaN into one weight, as a diverging update would."""
    name, p = next(iter(trainer.model.named_parameters()))
    p.assign(np.full(p.shape, np.nan, np.float32))
    return name


def test_nan_loss_keeps_the_last_good_checkpoint_and_stops(tmp_path, corpus, capsys):
    train(tiny_config(tmp_path, corpus, steps=4, eval_every=0))
    ckpt = tmp_path / "run" / "ckpt.safetensors"
    good = ckpt.read_bytes()

    def diverge(t: Trainer) -> None:
        if t.step == 5:
            _poison(t)  # step 6 computes a NaN loss from it

    out = train(tiny_config(tmp_path, corpus, steps=12, eval_every=0, ckpt_every=2,
                            resume=True), on_step=diverge)
    assert ckpt.read_bytes() == good  # neither step 6's save nor any later one replaced it
    assert out["steps"] == 6 and math.isnan(out["last_loss"])  # stopped: weights are NaN
    assert out["checkpoint_step"] == 4
    assert "the loss at step 6 is nan" in out["checkpoint_refused"]
    err = capsys.readouterr().err
    assert "NOT written: the loss at step 6 is nan" in err
    assert "the last good one (step 4) is kept" in err and "stopping at step 6" in err
    assert load_checkpoint(ckpt)[1]["step"] == 4


def test_finite_loss_with_nan_weights_is_not_saved(tmp_path, corpus, capsys):
    t = Trainer(tiny_config(tmp_path, corpus, steps=2, eval_every=0))
    out = t.run()
    ckpt = tmp_path / "run" / "ckpt.safetensors"
    good = ckpt.read_bytes()
    assert math.isfinite(out["last_loss"]) and t.last_loss == out["last_loss"]
    name = _poison(t)
    assert t.save() is False  # the loss read last is finite, the tensors are not
    assert ckpt.read_bytes() == good and t.diverged
    assert f"'model.{name}'" in t.refused and "hold NaN or inf" in t.refused
    assert "NOT written" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [
        "ckpt.safetensors", "loss.png", "metrics.jsonl"]  # no temporary left either


def test_sigint_checkpoints_at_the_step_boundary_and_resume_matches(tmp_path, corpus, capsys):
    straight = train(tiny_config(tmp_path / "a", corpus, steps=8))
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c(t: Trainer) -> None:
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # delivered inside the step callback

    cut = train(tiny_config(tmp_path / "b", corpus, steps=8), on_step=ctrl_c)
    assert signal.getsignal(signal.SIGINT) is before  # the trainer's handler is gone
    assert cut["interrupted"] == "SIGINT" and cut["steps"] == 3
    assert cut["checkpoint_step"] == 3 and cut["checkpoint_refused"] is None
    assert "SIGINT: writing a checkpoint at step 3" in capsys.readouterr().err
    ckpt = tmp_path / "b" / "run" / "ckpt.safetensors"
    assert load_checkpoint(ckpt)[1]["step"] == 3
    resumed = train(tiny_config(tmp_path / "b", corpus, steps=8, resume=True))
    assert resumed["interrupted"] is None
    assert resumed["last_loss"] == straight["last_loss"]
    a, _ = load_checkpoint(tmp_path / "a" / "run" / "ckpt.safetensors")
    b, _ = load_checkpoint(ckpt)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_cleans_up_after_a_killed_run(tmp_path, corpus, capsys):
    run = tmp_path / "run"

    def kill(t: Trainer) -> None:
        if t.step == 7:  # rows up to step 6 were flushed by the eval; the checkpoint is at 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, corpus, steps=8, eval_every=2, ckpt_every=4), on_step=kill)
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) >= 6
    stale = run / ".tmp-ckpt.safetensors.k1ll3d.safetensors"
    stale.write_bytes(b"half a checkpoint")  # what a SIGKILL mid-save leaves behind
    capsys.readouterr()
    train(tiny_config(tmp_path, corpus, steps=8, eval_every=2, ckpt_every=4, resume=True))
    err = capsys.readouterr().err
    assert not stale.exists() and f"removed {stale}" in err
    assert "row(s) after step 4 (logged after the checkpoint)" in err
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # no step twice
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 6, 8]


@pytest.mark.parametrize("field,value,message", [
    ("lr", float("nan"), "lr must be a finite number > 0"),
    ("lr", float("inf"), "lr must be a finite number > 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("min_lr", -1e-4, "min_lr must be a finite number >= 0"),
    ("min_lr", 0.5, "min_lr 0.5 is above lr"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ("grad_clip", 0.0, "grad_clip must be a finite number > 0"),
    ("grad_clip", float("nan"), "grad_clip must be a finite number > 0"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("precision", "f64", "precision must be one of"),
])
def test_bad_options_fail_before_any_work(tmp_path, corpus, field, value, message):
    with pytest.raises(TrainConfigError, match=message):
        Trainer(tiny_config(tmp_path, corpus, **{field: value}))
    assert not (tmp_path / "run").exists()


def test_resume_past_steps_or_from_an_incomplete_checkpoint_is_refused(tmp_path, corpus):
    train(tiny_config(tmp_path, corpus, steps=4, eval_every=0))
    ckpt = tmp_path / "run" / "ckpt.safetensors"
    for steps in (4, 3):
        with pytest.raises(TrainConfigError, match=f"already at step 4, and steps .* is {steps}"):
            Trainer(tiny_config(tmp_path, corpus, steps=steps, resume=True))
    tensors, meta = load_checkpoint(ckpt)
    victim = next(k for k in tensors if k.startswith("optim.m."))
    save_checkpoint(ckpt, {k: v for k, v in tensors.items() if k != victim}, meta)
    with pytest.raises(CheckpointError, match=f"missing tensor\\(s\\) '{victim}'"):
        Trainer(tiny_config(tmp_path, corpus, steps=8, resume=True))
    del meta["rng"]
    save_checkpoint(ckpt, tensors, meta)
    with pytest.raises(CheckpointError, match="metadata has no rng"):
        Trainer(tiny_config(tmp_path, corpus, steps=8, resume=True))
    head = "model.head.weight" if "model.head.weight" in tensors else next(
        k for k in tensors if k.startswith("model."))
    save_checkpoint(ckpt, {k: v for k, v in tensors.items() if k != head}, meta)
    with pytest.raises(CheckpointError, match=f"missing tensor\\(s\\) '{head}'"):
        load_model(ckpt)  # what examples/sample.py loads
    (tmp_path / "file").write_text("")
    with pytest.raises(TrainConfigError, match="exists and is not a folder"):
        Trainer(tiny_config(tmp_path, corpus, out_dir=str(tmp_path / "file")))


def test_throughput_leaves_out_the_compiling_first_step(tmp_path, corpus):
    one = train(tiny_config(tmp_path / "a", corpus, steps=1, eval_every=0))
    assert one["tokens_per_s"] is None  # no steady-state step to measure
    assert one["compile_s"] > 0 and one["first_step_s"] >= one["compile_s"]
    t0 = time.perf_counter()
    out = train(tiny_config(tmp_path / "b", corpus, steps=10, eval_every=5))
    wall = time.perf_counter() - t0
    tokens = 10 * 4 * 16  # steps * batch * block
    assert out["first_step_s"] >= out["compile_s"] > 0
    assert out["tokens_per_s"] > tokens / wall  # compile, eval and checkpoints are excluded
