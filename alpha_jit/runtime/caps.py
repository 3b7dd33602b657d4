"""The typed record of what a device can do, and loading it from `alpha-jit devices --json`.

Kernel choice, lowering and memory planning read only a `Capabilities`; nothing in planning
talks to Vulkan. That is what lets `alpha-jit dump-ir --plan-only --device-caps FILE` show,
on a laptop, the kernels, grids and memory plan an H200 would get: the record is queried from
a live device (`capabilities.query`) or read back from the JSON another machine wrote. The
loader is strict, because a plan made from a half-read file would be quietly wrong: a missing
or mistyped field is an error naming the file, the device and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpha_jit.errors import AlphaJitError


class CapsFileError(AlphaJitError, ValueError):
    """A capabilities file that cannot describe a device: unreadable, or a field missing or of
    the wrong type."""


@dataclass(frozen=True)
class CoopMatShape:
    """One cooperative-matrix configuration the device lists (VkCooperativeMatrixPropertiesKHR):
    A is m x k, B is k x n, C and the result m x n, at `scope`."""

    m: int
    n: int
    k: int
    a: str  # component type names: f16 | bf16 | f32 | i8 | ...
    b: str
    c: str
    result: str
    scope: str  # subgroup | workgroup | ...


@dataclass(frozen=True)
class FragmentLayout:
    """Where a cooperative-matrix fragment's elements live, as probed on the device (the KHR
    extension leaves it to the implementation): element e of lane l is cell
    `cells[l * length + e]` = row * cols + col. Kernels that keep softmax statistics in
    registers read rows and columns from it (`codegen_spirv/fragments.py`)."""

    elem: str  # component type name, as in CoopMatShape: bf16 | f16 | f32
    use: str  # a | b | acc
    rows: int
    cols: int
    lanes: int
    cells: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.cells) // self.lanes


@dataclass(frozen=True)
class Capabilities:
    index: int
    name: str
    device_type: str  # 'discrete' | 'integrated' | 'virtual' | 'cpu' | 'other'
    vendor_id: int
    device_id: int
    api_version: str
    driver_version: str
    driver_name: str
    float16: bool
    int8: bool
    int16: bool
    int64: bool
    storage_buffer_16bit: bool
    storage_buffer_8bit: bool
    bfloat16: bool
    cooperative_matrix: tuple[CoopMatShape, ...]
    subgroup_size: int
    min_subgroup_size: int
    max_subgroup_size: int
    subgroup_size_control: bool
    subgroup_arithmetic: bool
    vulkan_memory_model: bool
    max_shared_memory: int
    max_workgroup_invocations: int
    max_workgroup_size: tuple[int, int, int]
    max_workgroup_count: tuple[int, int, int]
    max_storage_buffer_range: int
    max_push_constants_size: int
    max_storage_buffers_per_stage: int
    min_storage_buffer_offset_alignment: int
    max_memory_allocation_size: int
    timestamp_period: float
    timestamp_compute: bool  # the compute queue supports timestamp queries
    extensions: tuple[str, ...]
    # shaderSignedZeroInfNanPreserveFloat32: kernels can forbid the driver from folding
    # x * 0 -> 0 or x / 0 -> 0, which would turn NaN and inf into numbers
    inf_nan_preserve_f32: bool = False
    # shaderDenormPreserveFloat32: kernels can keep f32 denormals (numpy's 1e-45 // -1 is -1);
    # without it a device may flush denormal inputs and results to zero
    denorm_preserve_f32: bool = False
    # VK_SUBGROUP_FEATURE_SHUFFLE_BIT in compute: the register-softmax row reductions need it
    subgroup_shuffle: bool = False
    # computeFullSubgroups: a pipeline can require every subgroup full (rows owned by a
    # subgroup, `kernels/rowwise.py`, need it; core in Vulkan 1.3)
    compute_full_subgroups: bool = False
    # probed by running a kernel (`codegen_spirv/fragments.py`), empty until a device is open
    fragment_layouts: tuple[FragmentLayout, ...] = ()

    def fingerprint(self) -> str:
        """Identity of (device, driver, capabilities); keys every on-disk cache. Cooperative-
        matrix shapes hash as plain tuples, so the value did not change when they became typed.
        Computed once per object (frozen): every generated kernel asks for it."""
        memo = self.__dict__.get("_fingerprint")
        if memo is not None:
            return memo
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.pop("index")  # enumeration order may change when another device appears
        fields["cooperative_matrix"] = tuple(dataclasses.astuple(c)
                                             for c in self.cooperative_matrix)
        if not self.compute_full_subgroups:  # records from before the field keep theirs
            fields.pop("compute_full_subgroups")
        if not self.fragment_layouts:  # records from before the probe keep their fingerprint
            fields.pop("fragment_layouts")
        else:
            fields["fragment_layouts"] = tuple(dataclasses.astuple(x)
                                               for x in self.fragment_layouts)
        fp = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]
        object.__setattr__(self, "_fingerprint", fp)  # not a field: eq, hash, replace ignore it
        return fp

    def summary(self) -> str:
        return (f"{self.index}: {self.name} ({self.device_type}, Vulkan {self.api_version}, "
                f"subgroup {self.subgroup_size}, shared {self.max_shared_memory // 1024} KiB)")

    def coopmat(self, a: str, c: str, scope: str = "subgroup") -> tuple[CoopMatShape, ...]:
        """The shapes with A and B of type `a` accumulating into `c` at `scope`."""
        return tuple(s for s in self.cooperative_matrix
                     if s.a == a and s.b == a and s.c == c and s.result == c and s.scope == scope)

    def fragment_layout(self, elem: str, use: str, rows: int = 16, cols: int = 16
                        ) -> FragmentLayout | None:
        """The probed layout of an (elem, use, rows x cols) subgroup fragment, if known."""
        for x in self.fragment_layouts:
            if (x.elem, x.use, x.rows, x.cols) == (elem, use, rows, cols):
                return x
        return None

    def spirv_target_env(self) -> str:
        """The spirv-val target environment for modules meant for this device."""
        major, minor = (int(x) for x in self.api_version.split(".")[:2])
        return f"vulkan{major}.{max(min(minor, 3), 2)}" if major == 1 else "vulkan1.3"

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values (what `alpha-jit devices --json` writes)."""
        return dataclasses.asdict(self)


def _check(value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type (lists -> tuples), or raise TypeError."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if hint in (CoopMatShape, FragmentLayout):
        names = [f.name for f in dataclasses.fields(hint)]
        what = "a cooperative-matrix entry" if hint is CoopMatShape else "a fragment layout"
        if isinstance(value, dict):
            missing = [n for n in names if n not in value]
            if missing:
                raise TypeError(f"{what} {value!r} lacks {missing}")
            value = [value[n] for n in names]
        if not isinstance(value, list | tuple) or len(value) != len(names):
            raise TypeError(f"expected {what} [{', '.join(names)}], got {value!r}")
        hints = typing.get_type_hints(hint)
        return hint(*(_check(v, hints[n]) for v, n in zip(value, names, strict=True)))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError(f"expected {len(args)} values, got {value!r}")
        return tuple(_check(v, a) for v, a in zip(value, args, strict=True))
    raise TypeError(f"no rule for {hint!r}")  # a new field type: teach _check


def from_dict(data: dict[str, Any], source: str = "<dict>") -> Capabilities:
    """A Capabilities from one device object of `alpha-jit devices --json`. Fields it does not
    know ("fingerprint", "selected", "variants") are ignored; a missing field without a default
    or a value of the wrong type raises CapsFileError; a missing field with a default (added
    after the file was written) warns and takes the default."""
    if not isinstance(data, dict):
        raise CapsFileError(f"{source}: expected a device object, got {type(data).__name__}")
    hints = typing.get_type_hints(Capabilities)
    name = data.get("name", "?")
    kwargs: dict[str, Any] = {}
    missing, defaulted = [], []
    for f in dataclasses.fields(Capabilities):
        if f.name not in data:
            if f.default is dataclasses.MISSING:
                missing.append(f.name)
            elif f.name in ("fragment_layouts", "subgroup_shuffle") \
                    and not data.get("cooperative_matrix"):
                pass  # only the register-softmax kernels read them, on coopmat devices
            else:
                defaulted.append(f"{f.name}={f.default!r}")
            continue
        try:
            kwargs[f.name] = _check(data[f.name], hints[f.name])
        except TypeError as e:
            raise CapsFileError(f"{source}: device {name!r}: field {f.name!r}: {e}") from None
    if missing:
        raise CapsFileError(
            f"{source}: device {name!r} lacks field(s) {', '.join(missing)}; write the file "
            "again with `alpha-jit devices --json > FILE` on that machine")
    if defaulted:
        warnings.warn(f"{source}: device {name!r} predates field(s) {', '.join(defaulted)}; "
                      "planning assumes those defaults (write the file again with "
                      "`alpha-jit devices --json` on that machine to be exact)", stacklevel=3)
    return Capabilities(**kwargs)


def load(path: str | Path, device: int | None = None) -> Capabilities:
    """The device described by a `alpha-jit devices --json` file: the one marked selected (or
    the only one), or the entry whose "index" is `device`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CapsFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise CapsFileError(f"{path}: not JSON ({e})") from None
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise CapsFileError(f"{path}: lists no device")
    if device is not None:
        found = [d for d in entries if isinstance(d, dict) and d.get("index") == device]
        if not found:
            raise CapsFileError(f"{path}: no device with index {device}")
        entry = found[0]
    else:
        chosen = [d for d in entries if isinstance(d, dict) and d.get("selected")]
        entry = chosen[0] if chosen else entries[0]
    return from_dict(entry, str(path))
