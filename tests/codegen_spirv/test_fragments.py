"""Fragment layouts: the analysis the register-softmax attention kernels rely on, on the layout
probed on the H200 and on made-up ones, and every module involved validating offline (the
kernels themselves run in tests/gpu, where a device has cooperative matrices)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from alpha_jit.codegen_spirv import fragments as F
from alpha_jit.codegen_spirv import tools
from alpha_jit.codegen_spirv.kernel import KernelSpec
from alpha_jit.codegen_spirv.kernels import attention as K
from alpha_jit.runtime import caps as caps_mod
from alpha_jit.runtime.caps import FragmentLayout

H200 = Path(__file__).resolve().parents[1] / "data" / "h200-caps.json"


def _h200():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return caps_mod.load(H200)


def _rows_covered(layout: FragmentLayout, rm: F.RowMap) -> None:
    """Independently of `analyse`: each class of each lane, joined over the xor masks' span,
    is exactly the cells of the row `rm.row` names, `rm.col` names each element's column, and
    exactly one lane of each such set writes the row's statistics."""
    cells = np.array(layout.cells).reshape(layout.lanes, layout.length)
    span = {0}
    for m in rm.masks:
        span |= {s ^ m for s in span}
    for lane in range(layout.lanes):
        assert sum((lane ^ m) & rm.pivots == 0 for m in span) == 1
        for es in rm.classes:
            row = rm.row.at(lane, es[0])
            got = sorted(int(cells[lane ^ m, e]) for m in span for e in es)
            assert got == [row * layout.cols + c for c in range(layout.cols)]
        for e in range(layout.length):
            assert cells[lane, e] == rm.row.at(lane, e) * layout.cols + rm.col.at(lane, e)


def test_the_h200_layout_is_taken_apart_in_registers():
    caps = _h200()
    acc = caps.fragment_layout("f32", "acc")
    assert acc is not None and acc.length == 8 and acc.lanes == 32
    rm = F.register_softmax_map(caps, "bf16n")
    assert rm is not None and len(rm.classes) == 2 and len(rm.masks) == 2
    _rows_covered(acc, rm)
    # an A fragment laid out differently from the accumulator: no register path
    a = caps.fragment_layout("bf16", "a")
    moved = dataclasses.replace(a, cells=a.cells[8:] + a.cells[:8])
    other = dataclasses.replace(caps, fragment_layouts=(acc, moved))
    assert F.register_softmax_map(other, "bf16n") is None
    assert F.register_softmax_map(dataclasses.replace(caps, fragment_layouts=()), "bf16n") is None
    assert F.register_softmax_map(dataclasses.replace(caps, subgroup_shuffle=False),
                                  "bf16n") is None


def test_a_wave32_wmma_style_accumulator_reduces_over_sixteen_lanes():
    # lane l holds column l % 16 of rows 2 e + l // 16 (AMD's RDNA3 accumulator, wave32)
    cells = tuple((2 * e + lane // 16) * 16 + lane % 16 for lane in range(32) for e in range(8))
    layout = FragmentLayout("f32", "acc", 16, 16, 32, cells)
    rm = F.analyse(layout)
    assert rm is not None and len(rm.classes) == 8 and sorted(rm.masks) == [1, 2, 4, 8]
    _rows_covered(layout, rm)


def test_masks_of_several_bits_still_have_one_writer_per_row():
    # lanes {l, l^3, l^16, l^19} share rows: a leader test on the masks' bits would pick none
    row_bits, col_bits = (1, 1, 2, 4, 0), (1, 0, 0, 0, 2)

    def xor(bits, lane):
        return F._xor_bits(bits, lane)

    cells = tuple((8 * (e // 4) ^ xor(row_bits, lane)) * 16 + (4 * (e % 4) ^ xor(col_bits, lane))
                  for lane in range(32) for e in range(8))
    layout = FragmentLayout("f32", "acc", 16, 16, 32, cells)
    rm = F.analyse(layout)
    assert rm is not None and 3 in rm.masks
    _rows_covered(layout, rm)


def test_layouts_without_the_structure_are_refused():
    rng = np.random.default_rng(0)
    shuffled = tuple(int(x) for x in rng.permutation(256))
    assert F.analyse(FragmentLayout("f32", "acc", 16, 16, 32, shuffled)) is None
    replicated = tuple((lane % 16) * 16 + e for lane in range(32) for e in range(16))
    assert F.analyse(FragmentLayout("f32", "acc", 16, 16, 32, replicated)) is None
    assert F.analyse(None) is None


def test_probe_words_parse_and_nonsense_is_dropped():
    lanes = 32
    acc = _h200().fragment_layout("f32", "acc")
    words = np.zeros(lanes * 64 + 1, np.uint32)
    words[:lanes * 64].reshape(lanes, 64)[:, :8] = np.array(acc.cells).reshape(lanes, 8)
    words[-1] = 8
    assert F.layout_from_words(words, "f32", "acc", lanes) == acc
    words[-1] = 0
    assert F.layout_from_words(words, "f32", "acc", lanes) is None
    words[-1] = 8
    words[3] = 999  # a cell outside the fragment
    assert F.layout_from_words(words, "f32", "acc", lanes) is None


@pytest.mark.parametrize("elem, use", [("f32", "acc"), ("bf16", "a"), ("f16", "a")])
def test_probe_kernels_validate(elem, use):
    caps = _h200()
    b = F.probe_binary(caps, elem, use)
    tools.validate(b.words, b.name, caps.spirv_target_env())


def _specs(b, h, hkv, t, hd, causal, dt, drop):
    ent = lambda n: (dt, 0, (n * t * hd, t * hd, hd, 1))  # noqa: E731
    base = (("b", b), ("h", h), ("hkv", hkv), ("t", t), ("hd", hd), ("causal", causal),
            ("scale", 1 / math.sqrt(hd)), ("q", ent(h)), ("k", ent(hkv)), ("v", ent(hkv)))
    extra = (("dropout", drop), ("seed", 7), ("salt", 3), ("ctr", 1)) if drop else ()
    bwd = (("o", (dt, 0, (h * t * hd, t * hd, hd, 1))), ("lse", ("f32", 0, (h * t, t, 1))),
           ("do", ("f32", 0, (h * t * hd, t * hd, hd, 1))))
    return [KernelSpec("attention_fwd", "fwd", (*base, *extra, ("out_dtype", dt),
                                                ("outputs", ("o", "lse")))),
            KernelSpec("attention_dq", "dq", (*base, *bwd, *extra)),
            KernelSpec("attention_dkdv", "dkdv", (*base, *bwd, *extra,
                                                  ("outputs", ("dk", "dv"))))]


@pytest.mark.parametrize("case", [(8, 12, 12, 1024, 64, True, "bf16", 0.0),
                                  (2, 4, 2, 100, 64, True, "bf16", 0.1),
                                  (1, 2, 2, 77, 32, False, "f16", 0.0),
                                  (1, 2, 1, 130, 128, True, "bf16", 0.0)],
                         ids=lambda c: "x".join(map(str, c)))
def test_register_kernels_validate_and_the_shared_variant_without_layouts(case):
    caps = _h200()
    bare = dataclasses.replace(caps, fragment_layouts=())
    for spec in _specs(*case):
        gen = getattr(K, K.FAMILIES[spec.family])
        for c, kind in ((caps, "registers"), (bare, "coopmat flash")):
            binary = gen(spec, c)
            assert kind in binary.variant, (spec.family, binary.variant)
            assert ("registers" in binary.variant) == (c is caps)
            tools.validate(binary.words, spec.name, target_env=c.spirv_target_env())
            assert binary.shared_bytes <= c.max_shared_memory


@pytest.mark.parametrize("case", [(8, 12, 12, 1024, 64, True, "bf16", 0.0),
                                  (2, 4, 2, 100, 64, True, "bf16", 0.1),
                                  (1, 2, 2, 77, 32, False, "f16", 0.0)],
                         ids=lambda c: "x".join(map(str, c)))
def test_two_row_blocks_per_subgroup_validate_and_dkdv_declines(case):
    """The register forward and dq with two 16-row blocks per subgroup (each B fragment feeds
    two products) pass spirv-val for 32- and 64-key tiles; dk/dv declines the tiling."""
    from alpha_jit.codegen_spirv.kernels import attention_coopmat as AC
    from alpha_jit.codegen_spirv.kernels import attention_registers as AR

    caps = _h200()
    for spec in _specs(*case):
        for block in (32, 64):
            cfg = AC.CmConfig(4, 32, block, row_blocks=2)
            binary = AR.generate(spec, caps, cfg)
            if spec.family == "attention_dkdv":
                assert binary is None
                continue
            assert "rows 128 (2 per subgroup)" in binary.variant, binary.variant
            tools.validate(binary.words, spec.name, target_env=caps.spirv_target_env())
            assert binary.shared_bytes <= caps.max_shared_memory
