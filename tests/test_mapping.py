"""mapping.contiguous: the blocked copy behind every rearranged tensor of a conversion."""

from __future__ import annotations

import einops
import numpy as np
import pytest

from gqa_convert.mapping import COPY_BLOCK, contiguous

# Every layout of configs/*.toml, with axis sizes that are not multiples of COPY_BLOCK.
LAYOUTS = [
    ("v m -> v m", (37, 21), {}),
    ("v m -> m v", (37, 21), {}),
    ("f m -> m f", (53, 21), {}),
    ("m f -> f m", (21, 53), {}),
    ("(n h) m -> n m h", (6 * 5, 21), {"n": 6}),
    ("(k h) m -> k m h", (2 * 5, 21), {"k": 2}),
    ("m (n h) -> n h m", (21, 6 * 5), {"n": 6}),
    ("(n h) -> n h", (6 * 5,), {"n": 6}),
    ("m -> m", (21,), {}),
]


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize(("layout", "shape", "sizes"), LAYOUTS, ids=[lay for lay, *_ in LAYOUTS])
def test_contiguous_equals_a_plain_copy(layout, shape, sizes, dtype):
    source = np.random.default_rng(0).integers(0, 60000, size=shape).astype(dtype)
    view = einops.rearrange(source, layout, **sizes)
    out = contiguous(view)
    assert out.flags.c_contiguous and out.dtype == view.dtype
    np.testing.assert_array_equal(out, np.ascontiguousarray(view))


def test_contiguous_blocks_a_long_strided_last_axis():
    source = np.arange(3 * (4 * COPY_BLOCK + 3), dtype=np.uint16).reshape(-1, 3)
    out = contiguous(source.T)  # last axis strided, 4 full blocks and a partial one
    assert not np.shares_memory(out, source)
    np.testing.assert_array_equal(out, source.T)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), ()])
def test_contiguous_handles_empty_and_scalar_arrays(shape):
    source = np.zeros(shape, dtype=np.uint16)
    np.testing.assert_array_equal(contiguous(source.T), source.T)
