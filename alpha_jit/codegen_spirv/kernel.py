"""The contract between lowering, kernel generators and the runtime.

Lowering produces a `KernelSpec` (hashable: family + baked parameters). A generator for that
family turns it into a `KernelBinary`: SPIR-V words plus everything the runtime needs to build a
pipeline and record dispatches (bindings, push-constant size, workgroup counts). The runtime
never looks inside a spec; it only reads the binary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelSpec:
    """What to generate. `params` holds everything baked into the module (shapes, strides,
    dtypes, the expression), as nested tuples of str/int/float/bool so that it hashes and
    prints stably."""

    family: str
    name: str
    params: tuple

    def key(self) -> str:
        """Stable content hash; with the device fingerprint it keys the pipeline caches."""
        return hashlib.sha256(repr((self.family, self.params)).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Binding:
    """Storage buffer `binding` in descriptor set 0, in declaration order."""

    name: str
    dtype: str  # element type name ("f32", "i32", ...) as seen by the shader
    writable: bool


@dataclass(frozen=True)
class Dispatch:
    """One vkCmdDispatch of the kernel: workgroup counts and the push-constant bytes for it."""

    groups: tuple[int, int, int]
    push_constants: bytes = b""


@dataclass
class KernelBinary:
    spec: KernelSpec
    words: bytes  # SPIR-V module, little-endian 32-bit words
    bindings: tuple[Binding, ...]
    local_size: tuple[int, int, int]
    dispatches: tuple[Dispatch, ...]
    push_constant_size: int = 0
    entry_point: str = "main"
    shared_bytes: int = 0  # workgroup memory used, checked against the device limit
    notes: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def variant(self) -> str:
        """What the generator chose for the device (tiling, reduction strategy), for tools."""
        return str(self.notes.get("variant", self.spec.family))
