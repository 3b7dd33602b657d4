"""Feasibility probe for the cooperative-matrix GEMM (issue 9): not used by the compiler.

A KHR cooperative-matrix GEMM written with the kernel DSL as it is: 256 threads as 8 subgroups
(2 x 4), a 128 x 128 x 32 tile, A and B staged through shared memory by the threads (so the
production kernel can keep rounding f32 operands on load and summing b's columns), 4 x 2 16x16
bf16/f16 fragments per subgroup with f32 accumulators in Function variables, and the
accumulators written to shared memory quarter by quarter so every element can go through the
matmul family's epilogue store. SPIR-V 1.6 + the Vulkan memory model (SPV_KHR_cooperative_matrix
requires it), spirv-val'd for the device's target env.

    python -m benchmarks.probes.coopmat_gemm      # on a GPU listing bf16/f16 16x16x16 shapes

checks odd shapes against float64 numpy and times 4096^3. Measured on the H200 (driver
580.159.04, 2026-11-23): rel. L2 <= 5e-6 on every shape; 4096^3 bf16 103 TFLOP/s (the SIMT
GEMM: 8.3 bf16-out, ~30 f32-out; torch.matmul 700), f16 36 TFLOP/s (not understood yet).
What the production variant still needs (see the issue 9 notes): the DSL's SPIR-V version and
memory model as options, a typed cooperative-matrix handle instead of raw `emit`,
`required_subgroup_size` plumbing, epilogue / colsum / rounding, 16-byte loads and double
buffering.
"""

from __future__ import annotations

import math
import time

import numpy as np

from alpha_jit import dtypes
from alpha_jit.codegen_spirv import tools
from alpha_jit.codegen_spirv.dsl import KernelBuilder
from alpha_jit.codegen_spirv.kernel import Dispatch, KernelSpec
from alpha_jit.runtime.device import get_device
from alpha_jit.runtime.executor import BarrierCmd, DispatchCmd
from alpha_jit.runtime.testing import run_kernel


def gen(M, N, K, caps, E="bf16"):  # noqa: N803 - GEMM dimensions
    """The probe GEMM o[M, N] = a[M, K] @ b[K, N], a and b of dtype E (bf16 or f16)."""
    kb = KernelBuilder("cm", 256, caps)
    m = kb.m
    m.version = (1, 6)
    m.emit("OpMemoryModel", "Logical", "Vulkan")
    m.capability("CooperativeMatrixKHR")
    m.extension("SPV_KHR_cooperative_matrix")
    en = "bf16n" if E == "bf16" else "f16"
    if E == "bf16":
        m.capability("BFloat16CooperativeMatrixKHR")
    a = kb.buffer("a", E, False)
    b = kb.buffer("b", E, False)
    o = kb.buffer("o", "f32", True)
    A = kb.shared(en, 128 * 40)
    B = kb.shared(en, 32 * 136)
    C = kb.shared("f32", 32 * 132)
    u = kb.u32
    def T(e, us):
        return m.emit(
            "OpTypeCooperativeMatrixKHR", kb.type(e), "Subgroup", u(16), u(16), u(us)
        )
    tA, tB, tC = T(en, 0), T(en, 1), T("f32", 2)
    tid = kb.local_index()
    sg = kb.subgroup_id()
    sr = sg / 4
    sc = sg % 4
    c0 = kb.workgroup_id(0) * 128
    r0 = kb.workgroup_id(1) * 128
    acc = []
    for _ in range(8):
        p = m.emit("OpVariable", kb.ptr_type("Function", tC), "Function")
        m.emit("OpStore", p, m.emit("OpConstantNull", tC))
        acc.append(p)
    with kb.loop(u(0), K, 32) as k0:
        for r in range(16):
            e = tid + r * 256
            ra = kb.fmin(r0 + e / 32, M - 1)
            kg = k0 + e % 32
            kc = kb.fmin(kg, K - 1)
            z = kb.cast(kb.f32(0), en)
            A.store((e / 32) * 40 + e % 32, kb.select(kg < K, a.load_raw(ra * K + kc), z))
            kg = k0 + e / 128
            kc = kb.fmin(kg, K - 1)
            cb = kb.fmin(c0 + e % 128, N - 1)
            B.store((e / 128) * 136 + e % 128, kb.select(kg < K, b.load_raw(kc * N + cb), z))
        kb.barrier()
        for kk in (0, 16):
            fa = [
                m.emit(
                    "OpCooperativeMatrixLoadKHR",
                    tA,
                    A._ptr((sr * 64 + i * 16) * 40 + kk),
                    u(0),
                    u(40),
                )
                for i in range(4)
            ]
            fb = [
                m.emit(
                    "OpCooperativeMatrixLoadKHR",
                    tB,
                    B._ptr(sc * 32 + (kk * 136 + j * 16)),
                    u(0),
                    u(136),
                )
                for j in range(2)
            ]
            for i in range(4):
                for j in range(2):
                    p = acc[i * 2 + j]
                    m.emit(
                        "OpStore",
                        p,
                        m.emit(
                            "OpCooperativeMatrixMulAddKHR",
                            tC,
                            fa[i],
                            fb[j],
                            m.emit("OpLoad", tC, p),
                        ),
                    )
        kb.barrier()
    for q in range(4):
        kb.barrier()
        with kb.if_(sr == q // 2):
            for ii in range(2):
                for j in range(2):
                    m.emit(
                        "OpCooperativeMatrixStoreKHR",
                        C._ptr(sc * 32 + (ii * 16 * 132 + j * 16)),
                        m.emit("OpLoad", tC, acc[((q % 2) * 2 + ii) * 2 + j]),
                        u(0),
                        u(132),
                    )
        kb.barrier()
        with kb.loop(tid, 4096, 256) as e:
            row = r0 + (q * 32) + e / 128
            col = c0 + e % 128
            with kb.if_((row < M) & (col < N)):
                o.store(row * N + col, C.load((e / 128) * 132 + e % 128))
    sp = KernelSpec("matmul", f"cm{M}x{N}x{K}{E}", (("m", M), ("n", N), ("k", K), ("e", E)))
    return kb.binary(
        sp,
        [Dispatch((math.ceil(N / 128), math.ceil(M / 128), 1), b"")],
        notes={"required_subgroup_size": 32},
    )


def main() -> None:
    """Odd shapes against float64 numpy, then 20 back-to-back 4096^3 dispatches timed."""
    dev = get_device()
    caps = dev.caps
    print(caps.name)
    rng = np.random.default_rng(0)
    for E in ("bf16", "f16"):
        for M, N, K in (
            (128, 128, 32),
            (1, 1, 1),
            (200, 300, 70),
            (257, 129, 1000),
            (4096, 4096, 4096),
        ):
            bn = gen(M, N, K, caps, E)
            tools.validate(bn.words, "cm", caps.spirv_target_env())
            x = rng.standard_normal((M, K)).astype(np.float32)
            y = rng.standard_normal((K, N)).astype(np.float32)
            if E == "bf16":
                xa, ya = dtypes.f32_to_bf16(x), dtypes.f32_to_bf16(y)
                xf, yf = dtypes.bf16_to_f32(xa), dtypes.bf16_to_f32(ya)
            else:
                xa, ya = x.astype(np.float16), y.astype(np.float16)
                xf, yf = xa.astype(np.float32), ya.astype(np.float32)
            want = xf.astype(np.float64) @ yf.astype(np.float64)
            (got,) = run_kernel(bn, [xa, ya], [((M, N), np.float32)])
            err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
            print(E, M, N, K, "rel_l2", err, "nan", np.isnan(got).any())
            if M == 4096:
                p = dev.pipeline(bn)
                rs = [dev.alloc(xa.nbytes), dev.alloc(ya.nbytes), dev.alloc(M * N * 4)]
                cmds = []
                for _i in range(20):
                    cmds += [DispatchCmd(p, rs, bn.dispatches[0]), BarrierCmd()]
                rec = dev.record(cmds, name="t")
                dev.wait(rec.submit())
                t = time.perf_counter()
                dev.wait(rec.submit())
                dt = (time.perf_counter() - t) / 20
                print(E, f"4096^3 {dt * 1e3:.3f} ms {2 * M * N * K / dt / 1e12:.1f} TFLOP/s")
                rec.release()
                for r in rs:
                    dev.free(r)


if __name__ == "__main__":
    main()
