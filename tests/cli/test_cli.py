"""`alpha-jit devices` and `alpha-jit dump-ir` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alpha_jit.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)


def test_devices_table_and_json():
    out = run_cli("devices")
    assert out.returncode == 0, out.stderr
    assert "subgrp" in out.stdout and "*" in out.stdout
    for precision in ("f32", "bf16", "f16"):
        assert f"\n  {precision} " in out.stdout
    js = run_cli("devices", "--json")
    devs = json.loads(js.stdout)
    assert devs and sum(d["selected"] for d in devs) == 1
    for key in ("name", "device_type", "api_version", "float16", "bfloat16",
                "cooperative_matrix", "subgroup_size", "max_shared_memory", "variants"):
        assert key in devs[0]


def test_devices_unknown_selection_is_an_error():
    out = run_cli("devices", env={"ALPHA_JIT_DEVICE": "no-such-gpu"})
    assert out.returncode != 0
    assert "no-such-gpu" in out.stderr and "0:" in out.stderr


def test_dump_ir_prints_every_stage_and_a_kernel():
    out = run_cli("dump-ir", "--kernel", "0", "examples/train_mlp.py", "--steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for title in ("after trace (forward)", "after autodiff", "traced step (fwd + bwd + opt)",
                  "after pass cse", "after pass dce", "== kernels:", "== memory plan: peak",
                  "== kernel 0:", "OpEntryPoint GLCompute"):
        assert title in text, title
    assert "train_mlp.py:" in text  # provenance reaches the kernel list


def test_dump_ir_user_errors_exit_2_before_running_anything(tmp_path):
    out = run_cli("dump-ir", str(tmp_path / "missing.py"))
    assert out.returncode == 2 and out.stdout == ""
    assert "alpha-jit dump-ir: error: script" in out.stderr
    assert "missing.py: no such file" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("dump-ir", "--kernel", "-1", "examples/train_mlp.py")
    assert out.returncode == 2 and out.stdout == ""
    assert "argument --kernel: expected an integer >= 0, got '-1'" in out.stderr


def test_dump_ir_kernel_out_of_range_is_reported_before_printing():
    out = run_cli("dump-ir", "--kernel", "100000", "examples/train_mlp.py", "--steps", "2")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "alpha-jit dump-ir: error: --kernel 100000: the step has" in out.stderr
    assert "after trace" not in out.stdout and "Traceback" not in out.stderr


def test_only_user_errors_become_exit_2():
    from alpha_jit.errors import DeviceNotFoundError, SpirvToolError, VulkanError
    from alpha_jit.train.checkpoint import CheckpointError
    from alpha_jit.train.config import error_message, is_user_error

    for e in (FileNotFoundError(2, "No such file or directory", "x.py"), CheckpointError("c"),
              DeviceNotFoundError("no gpu")):
        assert is_user_error(e), e
    for e in (AssertionError("bug"), VulkanError("vkQueueSubmit"), SpirvToolError("val"),
              KeyError("k"), ValueError("plain")):
        assert not is_user_error(e), e
    assert error_message(FileNotFoundError(2, "No such file or directory", "x.py")) == \
        "x.py: No such file or directory"
