"""Error types that carry where in the user's program a failure comes from.

A compiler error is only useful if it names the op, the shapes involved and the line of the
user's code that produced it; every error raised while tracing or compiling goes through here.
"""

from __future__ import annotations


class AlphaJitError(Exception):
    """Base class of every error alpha_jit raises on purpose."""


class TraceError(AlphaJitError):
    """A user program that cannot be traced: bad shapes, dtypes or arguments for an op."""

    def __init__(self, op: str, message: str, where: str | None = None):
        self.op = op
        self.where = where
        text = f"{op}: {message}"
        if where:
            text += f"\n  at {where}"
        super().__init__(text)


class ShapeError(TraceError):
    pass


class DTypeError(TraceError):
    pass


class VulkanError(AlphaJitError):
    """A Vulkan call returned an error code; the message names the call."""


class DeviceNotFoundError(AlphaJitError):
    pass


class NoVulkanLoaderError(AlphaJitError):
    pass


class SpirvToolError(AlphaJitError):
    """spirv-val / spirv-opt / spirv-dis rejected a module; names the kernel."""


class InternalCompilerError(AlphaJitError):
    """An invariant of alpha_jit itself failed: our bug, not the user's program. The message
    names the stage, the op, its shapes and the user's line so that a report can be acted on;
    a bare AssertionError from deep inside lowering never reaches a user."""

    def __init__(self, stage: str, message: str, where: str | None = None):
        self.stage, self.where = stage, where
        text = f"internal compiler error in {stage}: {message}"
        if where:
            text += f"\n  at {where}"
        text += "\n  (this is a bug in alpha_jit; please report it with the program above)"
        super().__init__(text)
