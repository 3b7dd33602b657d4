"""Sub-allocation, deferred frees on the timeline, staging regions, upload/download."""

import numpy as np
import pytest

from alpha_jit.errors import AlphaJitError
from alpha_jit.runtime.memory import MIN_ALIGNMENT, MemoryBlock, MemoryManager


@pytest.fixture()
def manager(device):
    m = MemoryManager(device)  # private heaps: other tests' allocations cannot interfere
    yield m
    device.synchronize()
    m.destroy()


def _intervals_disjoint(regions):
    spans = sorted((r.block.memory and id(r.block), r.offset, r.offset + r.reserved)
                   for r in regions)
    for (b0, _, e0), (b1, s1, _) in zip(spans, spans[1:], strict=False):
        if b0 == b1:
            assert e0 <= s1


def test_suballocation_alignment_and_no_overlap(manager, device):
    align = max(device.caps.min_storage_buffer_offset_alignment, MIN_ALIGNMENT)
    sizes = [1, 3, 256, 257, 1000, 4096, 12345, 4]
    regions = [manager.alloc(s) for s in sizes]
    for r, s in zip(regions, sizes, strict=True):
        assert r.size == s and r.reserved >= s and r.offset % align == 0
        assert r.offset + r.reserved <= r.block.size
    _intervals_disjoint(regions)
    assert len({id(r.block) for r in regions}) == 1  # small requests share one block


def test_reuse_after_free_and_coalescing(manager):
    a, b, c = manager.alloc(1000), manager.alloc(1000), manager.alloc(1000)
    manager.free(b)
    d = manager.alloc(900)
    assert d.offset == b.offset  # first fit takes the hole
    manager.free(a)
    manager.free(d)
    e = manager.alloc(2000)  # a and d coalesced into one hole big enough
    assert e.offset == a.offset
    with pytest.raises(AlphaJitError):
        manager.free(e) or manager.free(e)
    _ = c


def test_big_request_gets_own_block(manager, device):
    big = manager.alloc(80 << 20)
    assert big.block.size >= 80 << 20
    with pytest.raises(AlphaJitError, match="maxMemoryAllocationSize"):
        manager.alloc(device.caps.max_memory_allocation_size + 1)


def test_deferred_free_waits_for_timeline(manager, device):
    r = manager.alloc(4096)
    pending = device.last_submitted + 1  # a value not yet reached
    manager.free(r, after_value=pending)
    again = manager.alloc(4096)
    assert again.offset != r.offset or again.block is not r.block  # not reused yet
    assert manager.deferred
    scratch = device.alloc(16)
    device.upload(scratch, np.zeros(4, np.float32))  # submits and waits: timeline passes
    device.free(scratch)
    assert device.completed_value() >= pending
    manager.collect(device.completed_value())
    assert not manager.deferred
    assert manager.alloc(4096).offset == r.offset


def test_free_list_merge_unit():
    blk = MemoryBlock(None, None, 1024, "device", free_ranges=[(0, 1024)])
    offs = [blk.take(256) for _ in range(4)]
    assert offs == [0, 256, 512, 768] and blk.take(1) is None
    for o in (256, 768, 512, 0):
        blk.give_back(o, 256)
    assert blk.free_ranges == [(0, 1024)]


def test_staging_write_read(manager):
    s = manager.alloc_staging(64)
    assert s.host_visible
    data = np.arange(16, dtype=np.float32)
    s.write(data)
    assert np.frombuffer(s.read(64), np.float32).tolist() == data.tolist()
    s.write(b"\x01\x02", offset=4)
    assert s.read(2, offset=4) == b"\x01\x02"
    out = np.empty(16, np.float32)
    s.read_into(out)
    with pytest.raises(AlphaJitError):
        s.write(b"x" * 65)
    d = manager.alloc(64)
    assert not d.host_visible
    with pytest.raises(AlphaJitError):
        d.write(b"abc")


def test_upload_download_roundtrip(device):
    rng = np.random.default_rng(0)
    for dtype, n in [(np.float32, 1), (np.float32, 1037), (np.float16, 333), (np.int32, 4096),
                     (np.uint16, 77)]:
        a = (rng.standard_normal(n) * 100).astype(dtype)
        r = device.alloc(a.nbytes)
        device.upload(r, a)
        back = np.frombuffer(device.download(r, a.nbytes), dtype)
        np.testing.assert_array_equal(back, a)
        np.testing.assert_array_equal(device.download_array(r, (n,), dtype), a)
        device.free(r)
    r = device.alloc(16)
    device.upload(r, np.array([1, 2], np.int32), offset=8)
    assert np.frombuffer(device.download(r, 8, offset=8), np.int32).tolist() == [1, 2]
    with pytest.raises(AlphaJitError):
        device.upload(r, np.zeros(8, np.float32))
    device.free(r)


def test_transfers_larger_than_a_chunk_round_trip_and_never_grow_staging(device, monkeypatch):
    from alpha_jit.runtime import device as device_mod

    monkeypatch.setattr(device_mod, "TRANSFER_CHUNK", 1024)  # 10 chunks and a ragged tail
    a = np.random.default_rng(1).standard_normal(2600).astype(np.float32)  # 10400 bytes
    r = device.alloc(a.nbytes + 12)
    device.upload(r, a, offset=12)
    np.testing.assert_array_equal(np.frombuffer(device.download(r, a.nbytes, 12), np.float32), a)
    device.free(r)
    monkeypatch.undo()
    device.synchronize()
    staging = device.memory.staging_heap
    before = set(map(id, staging.blocks))  # other tests' steps may hold staging regions
    big = np.arange(staging.block_size // 2, dtype=np.int32)  # twice the first block's size
    r = device.alloc(big.nbytes)
    device.upload(r, big)
    np.testing.assert_array_equal(device.download_array(r, big.shape, np.int32), big)
    device.free(r)
    device.synchronize()
    grown = [b for b in staging.blocks if id(b) not in before]
    assert len(grown) <= 1 and all(b.size == staging.block_size for b in grown)


def test_alloc_many_packs_regions_that_live_together_into_blocks_sized_for_them(manager, device):
    heap = manager.device_heap
    small = manager.alloc_many([100, 5000])  # under a block: the usual first fit
    assert len(heap.blocks) == 1
    mib = 1 << 20
    sizes = [9 * mib + 1, 3 * mib, 1, 40 * mib, 20 * mib + 7, 777]  # > a 64 MiB block
    regions = manager.alloc_many(sizes)
    _intervals_disjoint(small + regions)
    new = heap.blocks[1:]
    reserved = sum(r.reserved for r in regions)
    assert sum(b.size for b in new) < reserved + mib * len(new)  # no 64 MiB tails
    assert all(r.size == n and r.offset % heap.alignment == 0
               for r, n in zip(regions, sizes, strict=True))
    rng = np.random.default_rng(2)
    data = [rng.integers(0, 255, n, dtype=np.uint8) for n in (sizes[2], sizes[5], 4096)]
    for r, a in zip((regions[2], regions[5], regions[3]), data, strict=True):
        device.upload(r, a)
    for r, a in zip((regions[2], regions[5], regions[3]), data, strict=True):
        np.testing.assert_array_equal(np.frombuffer(device.download(r, a.nbytes), np.uint8), a)
    with pytest.raises(AlphaJitError, match="maxMemoryAllocationSize"):
        manager.alloc_many([heap.max_block + 1, 64 * mib])


def test_trim_returns_only_wholly_free_blocks(manager, device):
    keep = manager.alloc(1024)
    big = manager.alloc(manager.device_heap.block_size * 2)  # its own block
    before = manager.allocated_bytes()
    manager.free(big)
    device.synchronize()
    freed = manager.trim()
    assert freed >= 2 * manager.device_heap.block_size
    assert manager.allocated_bytes() == before - freed
    assert any(b is keep.block for b in manager.device_heap.blocks)  # in use: it stays
    manager.free(keep)


def test_zero_states_are_filled_on_the_gpu_and_other_bits_are_uploaded(device):
    from alpha_jit.runtime.step import make_resident
    from alpha_jit.tensor import StateTensor

    junk = device.alloc(1 << 16)  # memory the states below may reuse must not leak into them
    device.upload(junk, np.full(1 << 14, 7.5, np.float32))
    device.free(junk)
    device.synchronize()
    values = [np.zeros((64, 32), np.float32),
              np.array([0.0, -0.0, 0.0], np.float32),  # -0.0 is not all-zero bits
              np.zeros(3, np.float16),  # 6 bytes: not a fill's multiple of 4, uploaded
              np.arange(5, dtype=np.float32)]
    holders = [StateTensor(v, f"s{i}") for i, v in enumerate(values)]
    uploads = device.stats["uploads"]
    make_resident(device, holders)
    assert device.stats["uploads"] - uploads == 3  # the f32 zeros were filled
    for h, v in zip(holders, values, strict=True):
        got = h.numpy()
        np.testing.assert_array_equal(got.view(np.uint8), v.view(np.uint8))


@pytest.mark.parametrize("nbytes", [0, 4, 1023, 1024, 2048, 3 * 1024 + 333, 10 * 1024])
def test_double_buffered_upload_is_exact_for_any_size(device, monkeypatch, nbytes):
    from alpha_jit.runtime import device as device_mod

    monkeypatch.setattr(device_mod, "TRANSFER_CHUNK", 1024)  # halves of 512 bytes
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    r = device.alloc(nbytes + 40)
    device.upload(r, np.full(nbytes + 40, 0xAB, np.uint8))
    device.upload(r, data, offset=20)
    back = np.frombuffer(device.download(r), np.uint8)
    np.testing.assert_array_equal(back[20:20 + nbytes], data)
    assert (back[:20] == 0xAB).all() and (back[20 + nbytes:] == 0xAB).all()  # nothing spilled
    device.free(r)


def test_upload_many_packs_small_buffers_and_splits_large_ones(device, monkeypatch):
    from alpha_jit.runtime import device as device_mod

    monkeypatch.setattr(device_mod, "TRANSFER_CHUNK", 1024)
    rng = np.random.default_rng(5)
    sizes = [3, 0, 700, 1024, 5, 2500, 512, 1, 4096 + 7]  # straddle both halves, ragged tails
    data = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    regions = [device.alloc(max(n, 1)) for n in sizes]
    submits, uploads = device.stats["submits"], device.stats["uploads"]
    device.upload_many(list(zip(regions, data, strict=True)))
    assert device.stats["uploads"] - uploads == len(sizes)
    # one submit per filled half: packing, not one per buffer or piece
    assert device.stats["submits"] - submits == -(-sum(sizes) // 512)
    for r, a in zip(regions, data, strict=True):
        if a.size:
            np.testing.assert_array_equal(np.frombuffer(device.download(r, a.size), np.uint8), a)
        device.free(r)
    device.upload_many([])  # nothing to do: no staging, no submit
    with pytest.raises(AlphaJitError, match="into a region of"):
        small = device.alloc(8)
        try:
            device.upload_many([(small, np.zeros(3, np.float32))])
        finally:
            device.free(small)


def test_an_upload_that_fails_mid_way_waits_and_frees_its_staging(device, monkeypatch):
    from alpha_jit.errors import VulkanError
    from alpha_jit.runtime import device as device_mod

    monkeypatch.setattr(device_mod, "TRANSFER_CHUNK", 1024)
    device.synchronize()
    in_use = device.memory.staging_heap.bytes_in_use
    calls = 0
    submit = device.submit_command_buffer

    def failing(cb):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise VulkanError("vkQueueSubmit failed (a test)")
        return submit(cb)

    monkeypatch.setattr(device, "submit_command_buffer", failing)
    r = device.alloc(4096)
    with pytest.raises(VulkanError):
        device.upload(r, np.ones(1024, np.float32))
    monkeypatch.undo()
    assert device.completed_value() == device.last_submitted  # the two submitted copies ended
    assert device.memory.staging_heap.bytes_in_use == in_use
    device.upload(r, np.arange(1024, dtype=np.float32))  # the device still works
    np.testing.assert_array_equal(device.download_array(r, (1024,), np.float32),
                                  np.arange(1024, dtype=np.float32))
    device.free(r)
