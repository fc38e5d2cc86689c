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
    # and with axes a multiple of 4 long
    ("f m -> m f", (52, 21), {}),
    ("(n h) m -> n m h", (6 * 8, 21), {"n": 6}),
    ("m (n h) -> n h m", (20, 6 * 8), {"n": 6}),
]


@pytest.mark.parametrize("dtype", [np.uint16, np.float16, np.float32])
@pytest.mark.parametrize(
    ("layout", "shape", "sizes"), LAYOUTS, ids=[f"{lay} {shape}" for lay, shape, _ in LAYOUTS]
)
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


@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_iter_arrays_frees_each_source_before_reading_the_next(tmp_path, family):
    """The conversion holds one source tensor at a time: when the next is read, no earlier
    one is alive (the consumer having dropped what it was given), and a stacked experts
    tensor is read once for all its experts. Before, the previous source stayed referenced
    during the next read: twice the largest tensor (8.79 GB for gpt-oss-120b's 4.25 GB
    stacked gate_up_proj, BENCHMARKS.md)."""
    import weakref

    from gqa_convert.mapping import iter_arrays, plan_conversion
    from tests.hf_models import make_hf_checkpoint

    plan = plan_conversion(make_hf_checkpoint(tmp_path / "src", family))
    read, alive_at_read, names = plan.source.read, [], []
    earlier: list[weakref.ref] = []

    def spy(name):
        alive_at_read.append(sum(ref() is not None for ref in earlier))
        names.append(name)
        array = read(name)
        earlier.append(weakref.ref(array))
        return array

    plan.source.read = spy
    arrays = iter_arrays(plan)
    count = 0
    while next(arrays, None) is not None:  # nothing kept between steps
        count += 1
    assert count == len(plan.tasks)
    assert alive_at_read == [0] * len(names)
    tasks = plan.tasks
    served = [  # read again unless the task before it took an expert of the same source
        i > 0 and tasks[i - 1].expert is not None and tasks[i - 1].source == t.source
        for i, t in enumerate(tasks)
    ]
    assert names == [t.source for t, kept in zip(tasks, served, strict=True) if not kept]
    assert any(served) == (family == "gpt_oss")
