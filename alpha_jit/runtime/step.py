"""A compiled step on the device: buffers, recorded command buffers, replay per call.

Built once per traced signature: lower the graph, generate and build every kernel, plan the
arena and the barriers, make parameters and optimizer state resident, and record the whole step
(input uploads, dispatches, state write-back, output readback) into a command buffer per
staging slot. A call checks the inputs, writes them and the host scalars into the staging slot
not used by the previous call (which may still be running), and re-submits. Returned values
are handles; reading one is the only point where the host waits for the GPU.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
import weakref
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from alpha_jit import dtypes
from alpha_jit.codegen_spirv.lower import Lowered
from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime.device import Device, get_device
from alpha_jit.runtime.executor import BarrierCmd, CopyCmd, DispatchCmd, TimestampCmd
from alpha_jit.runtime.plan import MemoryPlan
from alpha_jit.runtime.step_plan import STAGING_RING, StepPlan, plan_step

log = logging.getLogger("alpha_jit.runtime")
# struct codes of the host scalars' storage types (little-endian, as the staging bytes)
_PACK_CODE = {dtypes.float32: "f", dtypes.int32: "i"}
# signed integer dtype -> the unsigned one of its width (one reduction checks an id range)
_UNSIGNED = {np.dtype(f"i{n}"): np.dtype(f"u{n}") for n in (1, 2, 4, 8)}


def _within(a: np.ndarray, lo: int, hi: int) -> bool:
    """Every value of `a` is in [lo, hi). From 0, one reduction over the unsigned view (a
    negative value wraps past any hi the type's positive range holds): ids are checked on
    every call."""
    unsigned = _UNSIGNED.get(a.dtype)
    if lo == 0 and unsigned is not None and hi <= 1 << (8 * a.dtype.itemsize - 1):
        return int(np.maximum.reduce(a.view(unsigned), axis=None)) < hi
    return bool(lo <= a.min() and a.max() < hi)


def _check_bounds(i: int, a: np.ndarray, bounds: tuple) -> None:
    """Raise unless every value of argument i outside [lo, hi) is the allowed `also` value
    (masks are built only when the one-reduction check failed)."""
    lo, hi, op, where, also = bounds
    outside = (a < lo) | (a >= hi)
    if also is not None:
        outside &= a != also
    if outside.any():
        bad = a[outside].ravel()[0]
        raise AlphaJitError(f"{op}: argument {i} (shape {a.shape}) holds index "
                            f"{int(bad)}, outside [{lo}, {hi})\n  at {where}")


def _check_fits(i: int, a: np.ndarray, dt: dtypes.DType) -> None:
    """Raise if an integer argument holds a value the device's type cannot: the copy into
    staging narrows it, and 2**32 + 1 must not quietly become 1."""
    if a.dtype.kind not in "iu" or not a.size:
        return
    info = np.iinfo(dt.np_storage_dtype)
    outside = (a < info.min) | (a > info.max)
    if outside.any():
        raise AlphaJitError(
            f"argument {i} ({a.dtype}{list(a.shape)}) holds {int(a[outside].ravel()[0])}, "
            f"which does not fit the device's {dt.name} (range [{info.min}, {info.max}])")


class DeviceState:
    """Where a StateTensor lives on the device. Host reads and writes wait for everything
    submitted (any step may read or write it): a per-state "last writer" stamped on every
    call cost a loop over ~600 states per call, and missed steps that only read it."""

    def __init__(self, device: Device, holder: Any, region: Any = None, uploaded: bool = False):
        self.device, self.holder = device, holder
        self.nbytes = state_bytes(holder)
        self.region = region if region is not None else device.alloc(self.nbytes)
        if not uploaded:  # else the caller filled the region already
            device.upload(self.region, holder._host)
        holder._host = None

    def read(self) -> np.ndarray:
        self.device.synchronize()
        h = self.holder
        return self.device.download_array(self.region, h.shape, np.dtype(h.dtype.np_storage))

    def write(self, arr: np.ndarray) -> None:
        self.device.synchronize()  # no step in flight may still read the old value
        self.device.upload(self.region, np.array(arr, order="C"))


def state_bytes(holder: Any) -> int:
    return max(int(np.prod(holder.shape, dtype=np.int64)), 1) * holder.dtype.itemsize


def resident(device: Device, holder: Any) -> DeviceState:
    if holder._device is None:
        holder._device = DeviceState(device, holder)
    return holder._device


def make_resident(device: Device, holders: list[Any]) -> None:
    """Upload every holder not yet on the device, their regions carved from blocks sized for
    them together (`MemoryManager.alloc_many`): one by one, 64 MiB blocks left tails of
    unused memory (about 45 MiB for a GPT-2-sized model). All-zero states (optimizer moments)
    are filled on the GPU in one submit instead of uploaded; the rest stream through staging
    in one `Device.upload_many`."""
    new = list({id(h): h for h in holders if h._device is None}.values())
    regions = device.memory.alloc_many([state_bytes(h) for h in new])
    zero = [r.size % 4 == 0 and (known_zero(h._host) or _all_zero_bits(h._host))
            for h, r in zip(new, regions, strict=True)]
    try:
        if any(zero):  # else no submit: a retrace need not wait for steps in flight
            device.fill_zero([r for r, z in zip(regions, zero, strict=True) if z])
        device.upload_many([(r, h._host) for h, r, z in zip(new, regions, zero, strict=True)
                            if not z])
    except BaseException:  # Ctrl-C or a device error mid-upload: a retry allocates afresh
        for r in regions:
            device.free(r)
        raise
    for h, region in zip(new, regions, strict=True):
        h._device = DeviceState(device, h, region, uploaded=True)


# id -> weak reference of host arrays `mark_zero` declared all zero (arrays are not hashable)
_KNOWN_ZERO: dict[int, weakref.ref] = {}


def mark_zero(a: np.ndarray) -> None:
    """Declare `a`, which its caller has just made with np.zeros (optimizer moments), all zero
    bits, so that `make_resident` fills it on the GPU without reading it (a scan of GPT-2's
    moments took 0.17 s). `a` becomes read-only: an in-place write, which would make the mark
    a lie and training silently wrong, raises instead; `known_zero` refuses it while it is
    writable (making it writable, writing and setting it read-only again would defeat the
    check: only the state's own code touches its host array). A view is not marked (its base
    could be written through)."""
    if a.base is not None or not a.flags.c_contiguous or not a.flags.owndata:
        return
    a.flags.writeable = False
    key = id(a)

    def forget(ref: weakref.ref, key: int = key) -> None:
        if _KNOWN_ZERO.get(key) is ref:  # not a later array that got the same id
            del _KNOWN_ZERO[key]

    _KNOWN_ZERO[key] = weakref.ref(a, forget)


def known_zero(a: np.ndarray | None) -> bool:
    """`a` is the very array `mark_zero` marked, still read-only: all zero without a scan."""
    if a is None:
        return False
    ref = _KNOWN_ZERO.get(id(a))
    return ref is not None and ref() is a and not a.flags.writeable


def _all_zero_bits(a: np.ndarray) -> bool:
    """Every byte is 0 (so -0.0 is not: a fill writes +0.0)."""
    raw = a.reshape(-1).view(np.uint8)
    if raw[:64].any():  # random weights answer at once: no scan of the whole tensor
        return False
    wide = raw[: raw.size // 8 * 8].view(np.uint64)  # 8 bytes per compare
    return not wide.any() and not raw[wide.size * 8:].any()


class DeviceValue:
    """A value a step returned. `float(v)`, `v.item()`, `v.numpy()` wait for the GPU."""

    def __init__(self, exe: Executable, value: int, index: int, shape: tuple, dtype: Any):
        self._exe: Executable | None = exe
        self._value, self._index = value, index
        self.shape, self.dtype = shape, dtype
        self._host: np.ndarray | None = None

    def numpy(self) -> np.ndarray:
        if self._host is None and self._exe is not None:
            self._exe._fetch_outputs(self._value)
        if self._host is None:
            raise AlphaJitError("this value's step was released before it could be read")
        return self._host

    def item(self) -> float | int:
        return self.numpy().item()

    def __float__(self) -> float:
        return float(self.numpy())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.numpy()
        return a.astype(dtype) if dtype is not None else a

    def __repr__(self) -> str:
        shown = self._host if self._host is not None else "<on device>"
        return f"DeviceValue({shown}, {self.dtype}{list(self.shape)})"


@dataclass(frozen=True)
class BuildTimes:
    """Where a step's build went, in seconds: tracing (with autodiff), the passes, planning
    (lowering, the memory plan and the rest), GEMM tiling choices (timed on the device when
    the tuning cache is cold), kernel generation (or disk loads), the driver's pipelines,
    memory (allocation, zero fills and uploads) and recording. `alpha-jit bench`'s compile
    probe and `ALPHA_JIT_LOG=build` report it: the compile is their sum."""

    trace: float
    passes: float
    plan: float
    tune: float
    generate: float
    pipelines: float
    memory: float
    record: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def format(self) -> str:
        parts = ", ".join(f"{f.name} {getattr(self, f.name):.2f}" for f in fields(self))
        return f"{self.total:.2f} s ({parts})"


class Executable:
    """One traced signature compiled for one device."""

    released = False  # set by release(); a class default keeps __init__ untouched
    _out_meta: list | None = None  # (bytes, numpy dtype, shape, bf16) of each output
    _bindings: list | None = None  # each kernel's (region, offset, bytes), made by _commands

    def __init__(self, traced: Any, device: Device | None = None, profile: bool = False):
        self.traced = traced
        self.profile = profile or os.environ.get("ALPHA_JIT_PROFILE", "") == "1"
        self.device = dev = device or get_device()
        build = dev.pipelines.begin_build()  # times the build for its "cached under" note
        t0 = time.perf_counter()
        self.plan: StepPlan = plan_step(traced.graph, dev.caps, traced.state_names(),
                                        memory_budget=getattr(traced, "memory_budget", None),
                                        device=dev)
        self.plan.check_fits()  # before the driver compiles anything
        self.lowered: Lowered = self.plan.lowered
        self.binaries = self.plan.binaries
        t1 = time.perf_counter()
        self.pipelines = build.pipelines(self.binaries)  # the driver's compile, with its own bar
        t2 = time.perf_counter()
        self.mem: MemoryPlan = self.plan.memory
        self.barriers = self.plan.barriers
        self._allocate(self._alloc_pools())
        t3 = time.perf_counter()
        name = getattr(traced, "name", "step")
        # one recording per staging slot; a profiled step keeps to slot 0 (its timestamps)
        self.recordings = [dev.record(self._commands(self.profile, slot=i),
                                      name=f"{name} (slot {i})")
                           for i in range(1 if self.profile else STAGING_RING)]
        self.recording = self.recordings[0]
        p = self.plan
        self.build_times = BuildTimes(getattr(traced, "trace_s", 0.0),
                                      getattr(traced, "passes_s", 0.0),
                                      t1 - t0 - p.tune_s - p.generate_s, p.tune_s,
                                      p.generate_s, t2 - t1, t3 - t2, time.perf_counter() - t3)
        self._slot_value = [0] * len(self.recordings)  # last submit that used each slot
        self._slot_pending: list[list[DeviceValue]] = [[] for _ in self.recordings]
        self._next_slot = 0
        self._timed: Any = None  # the timestamped recording, made on first use by the profiler
        self.pending: list[DeviceValue] = []
        self.last_value = 0
        self.last_host_s = 0.0  # host time of the last call, entry to submit (benchmarks)

    # ---- building ----------------------------------------------------------------------------
    def _alloc_pools(self) -> list[Any]:
        """The arena's pools; none left held if one fails."""
        pools: list[Any] = []
        try:
            for n in self.plan.memory.pool_bytes:
                pools.append(self.device.alloc(n))
        except BaseException:
            for r in pools:
                self.device.free(r)
            raise
        return pools

    def _allocate(self, pools: list[Any]) -> None:
        dev, low, plan = self.device, self.lowered, self.plan
        self.pools = pools
        self.regions: dict[int, tuple[Any, int]] = {}  # buffer id -> (region, byte offset)
        self.states: dict[object, DeviceState] = {}
        make_resident(dev, [self.traced.state[b.key] for b in low.buffers.values()
                            if b.kind == "state"]
                      + [self.traced.state[k] for k in low.state_writes])
        for b in low.buffers.values():
            if b.kind == "temp" and b.id not in self.mem.state_alias:
                self.regions[b.id] = (self.pools[self.mem.pool_of[b.id]],
                                      self.mem.offsets[b.id])
            elif b.kind == "state":
                st = resident(dev, self.traced.state[b.key])
                self.states[b.key] = st
                self.regions[b.id] = (st.region, 0)
        # inputs and hparams: a device buffer each, filled from staging every call
        self.staged: list[tuple[int, int, Any]] = []  # (buffer id, staging offset, buffer)
        for bid, soff in plan.staged:
            b = low.buffers[bid]
            self.regions[bid] = (dev.alloc(b.nbytes), 0)
            self.staged.append((bid, soff, b))
        for key in low.state_writes:
            if key not in self.states:
                self.states[key] = resident(dev, self.traced.state[key])
        for w, r in self.mem.state_alias.items():  # updated in place
            self.regions[w] = self.regions[r]
        self.stagings = [dev.alloc_staging(max(plan.stage_bytes, 16))
                         for _ in range(STAGING_RING)]
        self.out_offsets = plan.out_offsets
        self.readbacks = [dev.alloc_staging(max(plan.out_bytes, 16))
                          for _ in range(STAGING_RING)]
        self._feeds()

    @property
    def planned_bytes(self) -> int:
        """Device memory this step's plan asks for: the arena, parameters and optimizer state,
        input/hparam buffers, staging and readback (known before anything runs)."""
        regions = [*self.pools, *self.stagings, *self.readbacks,
                   *(self.regions[bid][0] for bid, _, _ in self.staged),
                   *(st.region for st in self.states.values())]
        return sum(r.size for r in regions if r is not None)

    def _binding(self, bid: int) -> tuple[Any, int, int]:
        region, off = self.regions[bid]
        return region, off, self.lowered.buffers[bid].nbytes

    def _commands(self, timed: bool = False, serialize: bool = False,
                  slot: int = 0) -> list[Any]:
        """The step as commands, reading inputs from staging slot `slot` and writing outputs
        to its readback slot. `timed` adds a timestamp before (top of pipe) and after
        (bottom of pipe) every dispatch and none of the barriers the plan does not need;
        `serialize` adds a barrier before every kernel (isolated times, a different step)."""
        low = self.lowered
        if self._bindings is None:  # the same in every recording: ~6000 lookups for GPT-2
            self._bindings = [[self._binding(b) for b in [*k.reads, *k.writes]]
                              for k in low.kernels]
        cmds: list[Any] = []
        for bid, soff, b in self.staged:
            region, off = self.regions[bid]
            cmds.append(CopyCmd(self.stagings[slot], region, b.nbytes, soff, off))
        cmds.append(BarrierCmd())
        if timed:
            cmds.append(TimestampCmd("begin"))
        for i, (bufs, binary, pipe, bar) in enumerate(zip(self._bindings, self.binaries,
                                                          self.pipelines, self.barriers,
                                                          strict=True)):
            if bar or serialize:
                cmds.append(BarrierCmd())
            for j, d in enumerate(binary.dispatches):
                if j:
                    cmds.append(BarrierCmd())  # split dispatches of one kernel may overlap
                if timed:
                    cmds.append(TimestampCmd(f"{i}.{j}", "top"))
                cmds.append(DispatchCmd(pipe, bufs, d))
                if timed:
                    cmds.append(TimestampCmd(f"{i}.{j}"))
        cmds.append(BarrierCmd())
        if timed:
            cmds.append(TimestampCmd("end"))
        for key, bid in low.state_writes.items():
            alias = self.mem.state_alias.get(bid)
            if alias is not None and low.buffers[alias].key == key:
                continue  # the kernel wrote it in place (other states of the value: copied)
            region, off = self.regions[bid]
            cmds.append(CopyCmd(region, self.states[key].region, low.buffers[bid].nbytes, off, 0))
        for bid, roff in zip(low.outputs, self.out_offsets, strict=True):
            region, off = self.regions[bid]
            cmds.append(CopyCmd(region, self.readbacks[slot], low.buffers[bid].nbytes, off,
                                roff))
        return cmds

    def timed_recording(self, serialize: bool = False) -> Any:
        """The same step recorded with per-dispatch timestamps (made once, then reused)."""
        if self.profile and not serialize:
            return self.recording
        if self._timed is None or self._timed[0] != serialize:
            if self._timed is not None:
                self._timed[1].release()
            rec = self.device.record(self._commands(True, serialize),
                                     name=getattr(self.traced, "name", "step") + " (timed)")
            self._timed = (serialize, rec)
        return self._timed[1]

    # ---- running -----------------------------------------------------------------------------
    def check_inputs(self, args: list[np.ndarray]) -> None:
        """Raise, before any GPU work, on arguments that are not the compiled signature's, an
        index outside its bounds, or an integer the device's type cannot hold (checks read
        the caller's values: narrowing happens only as staging is written)."""
        if len(args) != len(self._args):
            raise AlphaJitError(f"{len(args)} argument(s) given; this step was compiled for "
                                f"{len(self._args)}")
        bounds_of = self.traced.index_bounds
        for i, (a, (shape, dt, storage)) in enumerate(zip(args, self._args, strict=True)):
            # an array already in the storage type is of the traced dtype: no lookup
            if a.shape != shape or (a.dtype is not storage and dtypes.from_numpy(a) is not dt):
                raise AlphaJitError(f"argument {i} is {a.dtype}{list(a.shape)}; this step was "
                                    f"compiled for {dt.name}{list(shape)}")
            bounds = bounds_of.get(i)
            # the common case costs one or two reductions; masks only when something is outside
            if bounds is not None and a.size and not _within(a, bounds[0], bounds[1]):
                _check_bounds(i, a, bounds)
            if a.dtype is not storage:
                _check_fits(i, a, dt)

    def _feeds(self) -> None:
        """What each call checks and writes, worked out once. An input is one copy into a
        view of the mapped slot with its traced shape and storage type (the cast, if any,
        included); every host scalar goes in with one `struct.pack_into` in offset order."""
        traced = [(tuple(shape), dtypes.dtype(name)) for shape, name in self.traced.signature[0]]
        self._args = [(shape, dt, dt.np_storage_dtype) for shape, dt in traced]
        self._views = [s.host_view() for s in self.stagings]
        inputs = [(b.key, soff, b) for _, soff, b in self.staged if b.kind == "input"]
        self._arg_dst = [[(key, view[soff:soff + math.prod(b.shape) * b.dtype.itemsize]
                           .view(b.dtype.np_storage_dtype).reshape(b.shape))
                          for key, soff, b in inputs] for view in self._views]
        providers = {id(hp.provider): hp.provider for hp in self.traced.hparams.values()}
        which = {pid: j for j, pid in enumerate(providers)}
        self._providers = list(providers.values())
        hps = self.traced.hparams
        self._hparam_src = [(key, which[id(hp.provider)], hp.name) for key, hp in hps.items()]
        scalars = sorted((soff, b) for _, soff, b in self.staged if b.kind != "input")
        self._scalar_src = [(which[id(hps[b.key].provider)], hps[b.key].name)
                            for _, b in scalars]
        self._scalar_slots = [(soff, b.dtype.np_storage_dtype) for soff, b in scalars]
        self._given: list[dict[str, Any]] = []  # each provider's values at the last call
        self._pack: struct.Struct | None = None
        self._pack_at = scalars[0][0] if scalars else 0
        if scalars and all(b.dtype in _PACK_CODE for _, b in scalars):
            fmt, at = "<", self._pack_at
            for soff, b in scalars:
                fmt += f"{soff - at}x{_PACK_CODE[b.dtype]}"
                at = soff + b.dtype.itemsize
            self._pack = struct.Struct(fmt)

    @property
    def last_hparams(self) -> dict[tuple, Any]:
        """Every hparam's value fed by the last call (tests replay it in the interpreter)."""
        given = self._given
        if not given:  # no call yet
            return {}
        return {key: given[j][name] for key, j, name in self._hparam_src}

    def _write_scalars(self, view: np.ndarray, values: list[Any]) -> None:
        """The host scalars into the slot: one pack, or numpy's conversion of each where the
        pack refuses a value (an f32 overflow becomes inf, an int32 one raises as before)."""
        if self._pack is not None:
            try:
                self._pack.pack_into(view, self._pack_at, *values)
                return
            except (OverflowError, struct.error, TypeError, ValueError):
                pass
        for (soff, np_dt), v in zip(self._scalar_slots, values, strict=True):
            raw = np.asarray(v, dtype=np_dt).reshape(-1).view(np.uint8)
            view[soff:soff + raw.nbytes] = raw

    def __call__(self, args: list[np.ndarray], recording: Any = None) -> list[DeviceValue]:
        """Write the inputs and submit the step (`recording`: another recording of it, e.g.
        the profiler's timed one). `last_host_s` gets the host time spent, waits excluded."""
        t0 = time.perf_counter()
        if self.released:
            raise AlphaJitError("this compiled step was released (evicted from its cache)")
        self.check_inputs(args)
        given = self._given = [p.next_hparams() for p in self._providers]
        values = [given[j][name] for j, name in self._scalar_src]
        # the slot used two calls ago: the previous step may still run while this one's
        # inputs are written (the recording's entry barrier orders the two on the GPU)
        slot = 0 if recording is not None else self._next_slot
        self._next_slot = (slot + 1) % len(self.recordings)
        waited = time.perf_counter()
        if self._slot_pending[slot]:  # its readback is about to be reused
            self._fetch_outputs(self._slot_pending[slot][0]._value)
        self.device.wait(self._slot_value[slot])  # its staging is about to be rewritten
        waited = time.perf_counter() - waited
        for i, dst in self._arg_dst[slot]:
            np.copyto(dst, args[i], casting="unsafe")  # integers checked above: none wraps
        if values:
            self._write_scalars(self._views[slot], values)
        value = (recording or self.recordings[slot]).submit()
        self.last_host_s = time.perf_counter() - t0 - waited
        self.last_value = self._slot_value[slot] = value
        self.pending = self._slot_pending[slot] = [
            DeviceValue(self, value, i, r.shape, r.dtype)
            for i, r in enumerate(self.lowered.returns)]
        return list(self.pending)

    def _fetch_outputs(self, value: int) -> None:
        """Read the outputs of the call that submitted `value` into its handles (once)."""
        slot = next((i for i, p in enumerate(self._slot_pending)
                     if p and p[0]._value == value), None)
        if slot is None:
            return
        pending = self._slot_pending[slot]
        self.device.wait(value)
        if self._out_meta is None:  # per call it was host time: computed once
            self._out_meta = [(self.lowered.buffers[r.buffer], r.shape)
                              for r in self.lowered.returns]
            self._out_meta = [(b.nbytes, np.dtype(b.dtype.np_storage), shape,
                               b.dtype == dtypes.bfloat16) for b, shape in self._out_meta]
        for h, (nbytes, np_dt, shape, bf16), off in zip(pending, self._out_meta,
                                                        self.out_offsets, strict=True):
            raw = self.readbacks[slot].read(nbytes, off)
            # the traced shape, not the buffer's: a returned view shares its base's buffer
            arr = np.frombuffer(raw, dtype=np_dt).reshape(shape).copy()
            h._host = dtypes.bf16_to_f32(arr) if bf16 else arr
            h._exe = None  # a read handle must not keep this step (and its graph) alive
        self._slot_pending[slot] = []
        if self.pending is pending:
            self.pending = []

    def release(self) -> None:
        """Give this step's device memory back (an evicted cache entry); idempotent.

        Waits for the last submit, fetches its outputs into the handles already returned (so
        they stay readable), then frees the arena, input/hparam buffers, staging and readback
        regions and the recording (command buffer, descriptor and query pools). States belong
        to their StateTensors and are shared by every step, pipelines to the device's memo
        (shared by module): neither is freed."""
        if self.released:
            return
        self.released = True
        dev = self.device
        if dev.handle is None:  # the device was closed: it destroyed all of this already
            return
        for pending in list(self._slot_pending):  # every call still unread
            if pending:
                self._fetch_outputs(pending[0]._value)
        for rec in self.recordings:
            rec.release()  # waits for its last submit
        if self._timed is not None:
            self._timed[1].release()
        regions = [*self.pools, *self.stagings, *self.readbacks]
        regions += [self.regions[bid][0] for bid, _, _ in self.staged]
        for region in regions:
            if region is not None and not region.freed:
                dev.free(region, self.last_value)

    def kernel_times(self) -> list[tuple[float, int, Any]]:
        """(GPU ms, kernel index, lowered kernel) of the last completed call, slowest first;
        only for an executable built with profile=True (or ALPHA_JIT_PROFILE=1). Kernels that
        overlap share the time they overlap (see `runtime/profiler.py`)."""
        from alpha_jit.runtime.profiler import attribute

        if self.released or not self.profile:
            return []
        stamps = self.recording.timestamps()
        if not stamps:
            return []
        per_kernel = attribute(stamps).kernel_ns
        out = [(ns / 1e6, i, self.lowered.kernels[i]) for i, ns in per_kernel.items()]
        return sorted(out, key=lambda r: -r[0])
