"""Training checkpoints: one safetensors file holding tensors plus a JSON metadata header.

A checkpoint must let `--resume` continue bit-identically, so it carries everything: model
parameters and optimizer moments as tensors under prefixed names (`model.<path>`,
`optim.m.<path>`, `optim.v.<path>`), and the config, step, optimizer scalars and RNG states as
JSON under one metadata key. safetensors is used because it is a plain, mmap-friendly format
other tools read, with no pickle. The file is written atomically (temp + fsync + rename), so a
crash mid-save leaves the previous checkpoint intact, and a tensor holding NaN or inf is
refused (`NonFiniteError`) so a diverged run never replaces a good checkpoint. Loading and
config checks raise `CheckpointError` naming the file (and a missing tensor or metadata key)
before any GPU work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from alpha_jit.errors import AlphaJitError
from alpha_jit.train.atomic import atomic_path

META_KEY = "alpha_jit"  # the one safetensors metadata entry that holds our JSON
FORMAT_VERSION = 1
_MISSING = "<missing>"


class CheckpointError(AlphaJitError, ValueError):
    """A checkpoint that cannot be written or used; the message names the file."""


class ConfigMismatchError(CheckpointError):
    """The checkpoint's config differs from the model's; `differences` lists each field."""

    def __init__(self, message: str, differences: list[tuple[str, Any, Any]]):
        super().__init__(message)
        self.differences = differences


class NonFiniteError(CheckpointError):
    """Tensors holding NaN or inf; `names` lists them. The file on disk was left as it was."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


def nonfinite_tensors(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point tensors with any NaN or inf, in the mapping's order."""
    bad = []
    for name, value in tensors.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad.append(name)
    return bad


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays, paths and dataclasses appear in configs; store them as plain JSON."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _write_tensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]) -> None:
    """The one place bytes hit the disk (tests replace it to simulate a crash mid-write)."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    *,
    allow_nonfinite: bool = False,
) -> Path:
    """Write tensors + meta to one `.safetensors` file atomically; returns the path.

    Everything is validated and serialised before the file is touched, so a bad tensor, a NaN
    or inf anywhere (unless `allow_nonfinite`) or a meta value JSON cannot hold leaves an
    existing checkpoint as it was.
    """
    dest = Path(path).expanduser()
    if dest.is_dir():
        raise CheckpointError(f"checkpoint path {dest}: is a directory")
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{dest}: tensor names must be non-empty strings, got {name!r}")
        if not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{dest}: tensor {name!r} is a {type(value).__name__}, expected a numpy array"
            )
        if value.dtype == object:
            raise CheckpointError(f"{dest}: tensor {name!r} has dtype object")
        arrays[name] = np.require(value, requirements="C")  # C-order bytes; keeps 0-d as 0-d
    bad = [] if allow_nonfinite else nonfinite_tensors(arrays)
    if bad:
        shown = ", ".join(repr(n) for n in bad[:3]) + (f" and {len(bad) - 3} more" if
                                                         len(bad) > 3 else "")
        raise NonFiniteError(f"{dest}: not written: {len(bad)} tensor(s) hold NaN or inf "
                             f"({shown})", bad)
    try:
        text = json.dumps({"format": FORMAT_VERSION, **meta}, default=_json_default)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{dest}: meta is not JSON-serialisable: {e}") from e
    with atomic_path(dest, suffix=".safetensors") as tmp:
        _write_tensors(arrays, tmp, {META_KEY: text})
    return dest


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read (tensors, meta) from a file written by `save_checkpoint`."""
    from safetensors import safe_open

    src = Path(path).expanduser()
    if not src.exists():
        raise CheckpointError(f"checkpoint {src}: file not found")
    if src.is_dir():
        raise CheckpointError(f"checkpoint {src}: is a directory, expected a .safetensors file")
    try:
        with safe_open(str(src), framework="np") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except OSError as e:
        raise CheckpointError(f"checkpoint {src}: cannot read ({e})") from e
    except Exception as e:  # safetensors raises its own SafetensorError on a malformed header
        size = src.stat().st_size
        raise CheckpointError(
            f"checkpoint {src}: not a safetensors file ({size} bytes): {e}"
        ) from e
    if META_KEY not in header:
        raise CheckpointError(
            f"checkpoint {src}: no '{META_KEY}' metadata (config, step, ...); "
            "was it written by alpha_jit.train.save_checkpoint?"
        )
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {src}: '{META_KEY}' metadata is not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {src}: '{META_KEY}' metadata is not a JSON object")
    meta.pop("format", None)
    return tensors, meta


def require_meta(meta: Mapping[str, Any], keys: Iterable[str], *,
                 path: str | os.PathLike[str]) -> None:
    """Raise CheckpointError naming the metadata keys `meta` lacks."""
    missing = [k for k in keys if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {Path(path)}: metadata has no {', '.join(missing)} "
                              "(written by another program or an older alpha_jit?)")


def require_tensors(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                    *, path: str | os.PathLike[str]) -> None:
    """Raise CheckpointError naming each expected tensor that is missing or has another shape."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {Path(path)}: missing tensor(s) {shown}{more}")
    for name, shape in expected.items():
        got = tuple(np.shape(tensors[name]))
        if got != tuple(shape):
            raise CheckpointError(f"checkpoint {Path(path)}: tensor {name!r} has shape "
                                  f"{list(got)}, the model expects {list(shape)}")


def _as_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise CheckpointError(f"config must be a mapping or a dataclass, got {type(config).__name__}")


def config_differences(
    meta_config: Any, model_config: Any, *, ignore: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, model value) for every field that differs, sorted by name."""
    a = json.loads(json.dumps(_as_dict(meta_config), default=_json_default))
    # A round trip through JSON makes tuples lists and numpy scalars ints, like the stored copy.
    b = json.loads(json.dumps(_as_dict(model_config), default=_json_default))
    skip = set(ignore)
    out = []
    for key in sorted(set(a) | set(b)):
        if key in skip:
            continue
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            out.append((key, va, vb))
    return out


def check_compatible(
    meta_config: Any,
    model_config: Any,
    *,
    path: str | os.PathLike[str] | None = None,
    ignore: Iterable[str] = (),
) -> None:
    """Raise ConfigMismatchError listing every differing field, e.g. `n_layer: checkpoint 6,
    model 4`. Call it before building the compiled step, so a mismatch costs no GPU work."""
    diffs = config_differences(meta_config, model_config, ignore=ignore)
    if not diffs:
        return
    where = f"checkpoint {Path(path)}" if path is not None else "checkpoint"
    lines = [f"  {k}: checkpoint {va}, model {vb}" for k, va, vb in diffs]
    raise ConfigMismatchError(
        f"{where} does not match the model config ({len(diffs)} field(s) differ):\n"
        + "\n".join(lines),
        diffs,
    )


def with_prefix(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{name: t} -> {prefix.name: t}: how model and optimizer state share one file."""
    return {f"{prefix}.{name}": t for name, t in tensors.items()}


def strip_prefix(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors under `prefix.`, with the prefix removed (inverse of `with_prefix`)."""
    head = prefix + "."
    return {name[len(head) :]: t for name, t in tensors.items() if name.startswith(head)}
