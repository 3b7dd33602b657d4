"""examples/train_gpt.py and examples/sample.py as a user runs them: bad options, paths and
checkpoints are `prog: error: ...` with exit status 2 (never a traceback); SIGTERM checkpoints
and exits cleanly."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpha_jit.train.checkpoint import load_checkpoint, save_checkpoint
from tests.train.tiny import write_corpus

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_gpt = _load("train_gpt")
sample = _load("sample")


def _usage_error(main, argv: list[str], capsys) -> str:
    """Run main(argv), expect exit status 2, return stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step tiny run: (corpus, out folder with its checkpoint)."""
    root = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(root / "corpus.txt")
    out = root / "run"
    train_gpt.main(["--config", "tiny", "--steps", "2", "--data", str(corpus), "--out", str(out),
                    "--eval-every", "0"])
    return corpus, out


@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0"),
    (["--lr=-3e-4"], "argument --lr: expected a finite number > 0"),
    (["--min-lr", "nan"], "argument --min-lr: expected a finite number >= 0"),
    (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr 0.003"),
    (["--weight-decay", "-0.1"], "argument --weight-decay: expected a finite number >= 0"),
    (["--grad-clip", "0"], "argument --grad-clip: expected a finite number > 0"),
    (["--grad-clip", "nan"], "argument --grad-clip: expected a finite number > 0"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    (["--eval-every", "-1"], "argument --eval-every: expected an integer >= 0"),
])
def test_train_gpt_rejects_bad_numbers_at_parse_time(argv, message, capsys):
    err = _usage_error(train_gpt.main, ["--resume", *argv], capsys)
    assert f"train_gpt.py: error: {message}" in err


def test_train_gpt_user_errors_exit_2_with_the_reason(tiny_run, tmp_path, capsys):
    corpus, out = tiny_run
    base = ["--config", "tiny", "--data", str(corpus), "--eval-every", "0"]
    err = _usage_error(train_gpt.main, [*base, "--data", str(tmp_path / "nope.txt")], capsys)
    assert "train_gpt.py: error: data path" in err and "nope.txt: does not exist" in err
    err = _usage_error(train_gpt.main, [*base, "--out", str(tmp_path / "empty"), "--resume"],
                       capsys)
    assert "empty/ckpt.safetensors: file not found" in err
    err = _usage_error(train_gpt.main, [*base, "--out", str(out), "--resume", "--steps", "2"],
                       capsys)
    assert "is already at step 2, and steps (--steps) is 2: nothing to train" in err
    err = _usage_error(train_gpt.main, ["--data", str(corpus), "--out", str(out), "--resume"],
                       capsys)
    assert "does not match the model config" in err and "n_layer: checkpoint 1, model 4" in err
    (tmp_path / "file").write_text("")
    err = _usage_error(train_gpt.main, [*base, "--out", str(tmp_path / "file")], capsys)
    assert "exists and is not a folder" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.safetensors").write_bytes(b"not a checkpoint")
    err = _usage_error(train_gpt.main, [*base, "--out", str(bad), "--resume"], capsys)
    assert "not a safetensors file" in err


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "0"], "argument --tokens: expected an integer >= 1, got '0'"),
    (["--tokens", "-5"], "argument --tokens: expected an integer >= 1"),
    (["--temperature", "-1"], "argument --temperature: expected a finite number >= 0"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number >= 0"),
    (["--top-k", "-1"], "argument --top-k: expected an integer >= 0"),
    (["--prompt", "ab\udcff"], "--prompt: the prompt is not valid UTF-8 text (byte 0xff at "
                               "position 2)"),
])
def test_sample_rejects_bad_options(argv, message, capsys, tmp_path):
    err = _usage_error(sample.main, ["--ckpt", str(tmp_path / "none"), *argv], capsys)
    assert f"sample.py: error: {message}" in err


def test_sample_checkpoint_errors_name_the_problem(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    err = _usage_error(sample.main, ["--ckpt", str(tmp_path / "none.safetensors")], capsys)
    assert "none.safetensors: file not found" in err
    tensors, meta = load_checkpoint(out / "ckpt.safetensors")
    victim = next(k for k in tensors if k.startswith("model."))
    save_checkpoint(tmp_path / "c.safetensors", {k: v for k, v in tensors.items()
                                                 if k != victim}, meta)
    err = _usage_error(sample.main, ["--ckpt", str(tmp_path / "c.safetensors")], capsys)
    assert f"missing tensor(s) '{victim}'" in err
    save_checkpoint(tmp_path / "d.safetensors", tensors, {**meta, "config": {"n_wings": 2}})
    err = _usage_error(sample.main, ["--ckpt", str(tmp_path / "d.safetensors")], capsys)
    assert "its model config is not usable" in err
    text = sample.main(["--ckpt", str(out / "ckpt.safetensors"), "--temperature", "0",
                        "--tokens", "3", "--prompt", "jit "])
    assert isinstance(text, str)


def test_sample_non_utf8_prompt_from_argv_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "examples/sample.py", "--prompt", b"\xff",
                          "--ckpt", str(tmp_path / "none")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "sample.py: error: --prompt: the prompt is not valid UTF-8 text (byte 0xff" \
        in out.stderr
    assert "Traceback" not in out.stderr


def test_train_gpt_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "run"
    log = open(tmp_path / "stderr.txt", "w")  # a file, not a pipe: the progress bar never blocks
    proc = subprocess.Popen([sys.executable, "examples/train_gpt.py", "--config", "tiny",
                             "--steps", "100000", "--data", str(corpus), "--out", str(out),
                             "--eval-every", "3"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=log, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists():  # the first eval flushed: the loop runs
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never reached its first eval"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SIGTERM: writing a checkpoint at step" in err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["interrupted"] == "SIGTERM" and 3 <= result["steps"] < 100000
    assert result["checkpoint_step"] == result["steps"]
    assert load_checkpoint(out / "ckpt.safetensors")[1]["step"] == result["steps"]
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.safetensors", "loss.png",
                                                    "metrics.jsonl"]
    assert os.path.getsize(out / "metrics.jsonl") > 0


def test_custom_model_example_trains_evaluates_and_reloads(capsys):
    """examples/custom_model.py: a custom layer, separate train/eval steps (each traced once:
    the mode each sets itself does not retrace the other), state_dict save/load, a profile."""
    result = _load("custom_model").main(["--steps", "60", "--profile"])
    err = capsys.readouterr().err
    assert "GatedResidual(" in err and "(drop): Dropout(p=0.1, inplace=False)" in err
    assert "custom_model.py:" in err  # the profile names the example's lines
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert result["eval_accuracy"] > 0.8
    assert result["reloaded_accuracy"] == result["eval_accuracy"]
    assert result["traces"] == 2
