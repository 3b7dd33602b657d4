"""Run one kernel on numpy arrays: the harness kernel authors test against numpy with.

A kernel generator's test builds a KernelBinary, calls `run_kernel(binary, inputs, outs)` and
compares the returned arrays with the numpy reference. Everything a real step does happens
here in miniature: pipeline build (with limit validation), device-local buffers, upload,
one recorded command buffer with barriers between dispatches, a timeline submit, readback.
bf16 data travels as np.uint16 bit patterns, exactly as it is stored on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alpha_jit.codegen_spirv.kernel import KernelBinary
from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime.device import Device, get_device
from alpha_jit.runtime.executor import BarrierCmd, Command, DispatchCmd, FillCmd
from alpha_jit.runtime.memory import BufferRegion

OutSpec = tuple[Sequence[int], "np.dtype | type | str"]


def run_kernel(binary: KernelBinary, arrays: Sequence[np.ndarray], out_specs: Sequence[OutSpec],
               device: Device | None = None, fill: int = 0) -> list[np.ndarray]:
    """Bind `arrays` then one fresh buffer per out spec to bindings 0..n-1, run every dispatch
    of `binary` (barriers between them) and return the outputs.

    Outputs start filled with the 32-bit pattern `fill` (0: zeros), so a kernel that skips
    elements shows up as zeros rather than stale memory."""
    dev = get_device() if device is None else device
    n_bind = len(arrays) + len(out_specs)
    if n_bind != len(binary.bindings):
        raise AlphaJitError(
            f"kernel {binary.name!r} declares {len(binary.bindings)} bindings "
            f"({', '.join(b.name for b in binary.bindings)}); got {len(arrays)} inputs and "
            f"{len(out_specs)} outputs")
    pipeline = dev.pipeline(binary)
    regions: list[BufferRegion] = []
    recording = None
    try:
        for a in arrays:
            a = np.ascontiguousarray(a)
            region = dev.alloc(max(a.nbytes, 4))  # an empty binding still needs a buffer
            regions.append(region)
            if a.nbytes:
                dev.upload(region, a)
        outs = [np.empty(tuple(shape), dtype=np.dtype(dt)) for shape, dt in out_specs]
        out_regions = [dev.alloc(max(o.nbytes, 4)) for o in outs]
        regions.extend(out_regions)

        commands: list[Command] = [FillCmd(r, value=fill) for r in out_regions]
        if commands:
            commands.append(BarrierCmd())
        for i, d in enumerate(binary.dispatches):
            if i:
                commands.append(BarrierCmd())  # later dispatches may read earlier results
            commands.append(DispatchCmd(pipeline, list(regions), d))
        recording = dev.record(commands, name=f"run_kernel:{binary.name}")
        dev.wait(recording.submit())
        for o, r in zip(outs, out_regions, strict=True):
            if o.nbytes:
                o[...] = np.frombuffer(dev.download(r, o.nbytes), o.dtype).reshape(o.shape)
        return outs
    finally:
        if recording is not None:
            recording.release()
        for r in regions:
            dev.free(r)
