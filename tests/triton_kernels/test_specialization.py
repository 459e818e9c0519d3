"""Arguments that change from one engine step to the next must not be compile-time values: Triton
compiles a kernel once per constexpr value and per specialization of an int (1, a multiple of 16,
anything else), and a cold engine compiled 11 such variants (3.5 s) inside its first steps of
workload A (docs/results/step_profile_h200)."""

import pytest
import torch
from helpers import layout_for
from vllm_kvpress.triton_kernels import cache_write, decode_attention, prefill_attention, read_pages

from vllm_kvpress import decode


def _unspecialized(kernel) -> set[str]:
    """The kernel's arguments Triton does not specialize (interpreter or JIT function)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    return set(kernel.kwargs.get("do_not_specialize") or ())


def _arguments(kernel) -> list[str]:
    return list(kernel.arg_names)


@pytest.mark.parametrize("kernel,per_step", [
    (read_pages._read_pages_kernel, "first_row"),
    (prefill_attention._prefill_kernel, "first_seq"),
    (cache_write._stage_tokens_kernel, "num_tokens"),
    (decode_attention._reduce_splits_kernel, "num_splits"),
])
def test_per_step_integers_compile_once(kernel, per_step):
    assert per_step in _arguments(kernel)
    assert per_step in _unspecialized(kernel)


def test_the_split_count_is_the_grid_not_an_argument():
    """The Triton decode kernel reads its split count from the grid; the reduce kernel loops over
    the count it is given, so neither has a compile-time split count."""
    assert not any("SPLITS" in name for name in _arguments(decode_attention._decode_split_kernel))
    assert [name for name in _arguments(decode_attention._reduce_splits_kernel) if "SPLITS" in name] == [
        "SPLITS_PER_STEP"]


@pytest.mark.parametrize("num_splits", [0, decode_attention.MAX_SPLITS + 1])
def test_split_counts_beyond_the_bound_are_refused(num_splits):
    layout, _ = layout_for("kivi", 64)
    q = torch.randn(2, 4, 64).bfloat16()
    cache = torch.zeros(3, 2, layout.bytes_per_head, dtype=torch.uint8)
    buffers = decode_attention.split_buffers(2 * (decode_attention.MAX_SPLITS + 1), 4, 64, "cpu")
    with pytest.raises(ValueError, match=f"num_splits={num_splits}: allowed: 1 to {decode_attention.MAX_SPLITS}"):
        decode.decode_attention(q, cache, torch.zeros(2, 1, dtype=torch.int32),
                                          torch.ones(2, dtype=torch.int32), torch.empty_like(q), layout, scale=0.125,
                                          num_splits=num_splits, split_buffers=buffers)
