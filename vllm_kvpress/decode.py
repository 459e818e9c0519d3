"""Owns decode attention over compressed pages: which split kernel runs (the CUDA one,
vllm_kvpress/cuda_decode.py, wherever it takes the pages; the Triton one,
triton_kernels/decode_attention.py, elsewhere), and the Triton reduction that merges the splits.

Both split kernels read the same pages and write the same split format, so the choice is per
layout and machine (`decode_kernel`), made once; the CUDA kernel reaches the tensor cores without
Triton's layout conversions (docs/results/decode_kernel.md).
"""

import functools

import torch

from vllm_kvpress import cuda_decode
from vllm_kvpress.layout import PageLayout
from vllm_kvpress.triton_kernels.checks import check_tensor
from vllm_kvpress.triton_kernels.decode_attention import (
    DECODE_NUM_STAGES,
    LOG2E,
    MAX_SPLITS,
    decode_splits,
    reduce_splits,
)
from vllm_kvpress.triton_kernels.exact_tail import tail_arguments
from vllm_kvpress.triton_kernels.page_format import (
    INTERPRETER,
    MIXED_HIGH,
    MIXED_LOW,
    headwise_arguments,
    mixed_arguments,
)


@functools.cache
def decode_kernel(layout: PageLayout, group: int, query_dtype: torch.dtype, device: torch.device) -> tuple[str, str]:
    """("cuda" | "triton", why) for decode over these pages: the CUDA kernel wherever it takes them
    (it reads the same pages with fewer instructions), Triton under TRITON_INTERPRET and elsewhere."""
    if INTERPRETER:
        return "triton", "TRITON_INTERPRET=1 runs Triton kernels on the CPU"
    reason = cuda_decode.unavailable_reason(layout, group, query_dtype, device)
    if reason:
        return "triton", f"the CUDA kernel does not take {reason}"
    return "cuda", "csrc/decode_attention.cu takes these pages"


def decode_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    layout: PageLayout,
    *,
    scale: float,
    num_splits: int,
    split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_warps: int | None = None,
    num_stages: int = DECODE_NUM_STAGES,
    kernel: str = "auto",
    min_ctas: int = cuda_decode.MIN_CTAS,
    headwise: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
    mixed: tuple[torch.Tensor, PageLayout, int] | None = None,
) -> torch.Tensor:
    """Attention of one decode token per sequence over its compressed pages.

    Args:
        query: [num_seqs, num_heads, head_size] fp16/bf16, row i = the decode token of sequence i.
        cache: uint8 [num_blocks, num_kv_heads, layout.bytes_per_head].
        block_table: int32 [>= num_seqs, max_blocks]; seq_lens: int32 [>= num_seqs] (this token included).
        out: [num_seqs, num_heads, head_size] written in place (query dtype).
        num_splits: blocks of a sequence are cut into this many runs (fixed per batch size).
        split_buffers: from `split_buffers(>= num_seqs * num_splits, num_heads, head_size)`.
        num_warps: warps per program (Triton) or CTA (CUDA), None for the kernel's own default;
            num_stages (Triton), min_ctas (CUDA's `__launch_bounds__`): launch tuning, the defaults
            are the microbenchmark's picks (and the CUDA build the metadata builder makes up front).
        kernel: "cuda" (csrc/decode_attention.cu), "triton" (triton_kernels/decode_attention.py), or
            "auto": CUDA wherever it takes the pages (`decode_kernel`), Triton elsewhere. Both write
            the same splits.
        headwise: for head-wise packed requests (RazorAttention, eviction/headwise.py): int32
            [>= num_seqs, 3] (kept K, chunks n, middle M) per row, int32 [num_kv_heads] each KV
            head's rank among the layer's retrieval heads (-1: not one), and their count R. Rows
            with n = M = 0 read as usual. "auto" reads them with the Triton kernel.
        tail: with `layout.exact_tail_keys`: (the layer's exact tail, int32 [>= num_seqs] each
            row's request-state slot), where partial blocks keep their keys (exact_tail.py).
        mixed: for mixed-precision requests (MiKV, vllm_kvpress/mixed_layout.py): int32 [>= num_seqs, 3]
            (important K, chunks n, low blocks L) per row, all 0 for a row that is not split, the
            low-precision units' layout and U, their count per block. Read by the Triton kernel in
            two passes (high blocks, low units), each in `num_splits` splits, so `split_buffers`
            must hold 2 * num_splits per sequence.
    """
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads = cache.shape[1]
    check_tensor("query", query, dtype=(torch.float16, torch.bfloat16), shape=(None, None, layout.head_size))
    check_tensor("cache", cache, dtype=torch.uint8, shape=(None, None, layout.bytes_per_head))
    check_tensor("block_table", block_table, dtype=torch.int32, ndim=2)
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, ndim=1)
    check_tensor("out", out, dtype=query.dtype, shape=(num_seqs, num_heads, head_size))
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    part_max = split_buffers[1]
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits={num_splits}: allowed: 1 to {MAX_SPLITS}")
    total_splits = num_splits * (2 if mixed is not None else 1)
    if part_max.numel() < num_seqs * total_splits * num_heads:
        raise ValueError(f"split_buffers are too small for num_seqs * {total_splits} splits")
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    row_params, retrieval, retrieval_heads = headwise_arguments(headwise, num_kv_heads, block_table)
    tail_args = tail_arguments(tail, layout, block_table)
    if mixed is not None:
        if headwise is not None or kernel == "cuda":
            raise ValueError("mixed-precision pages are read by the Triton kernel alone, without head-wise packing")
        mixed_args = mixed_arguments(mixed, block_table)
        for mixed_pass, pass_layout in ((MIXED_HIGH, layout), (MIXED_LOW, mixed[1])):
            decode_splits(query, cache, block_table, seq_lens, pass_layout, scale=scale, num_splits=num_splits,
                          split_buffers=split_buffers, headwise_args=(row_params, retrieval, retrieval_heads),
                          tail_args=tail_args, headwise=False, num_warps=num_warps, num_stages=num_stages,
                          mixed_args=mixed_args, mixed_pass=mixed_pass.value,
                          split_offset=0 if mixed_pass is MIXED_HIGH else num_splits, total_splits=total_splits)
        return reduce_splits(split_buffers, out, total_splits)
    if headwise is not None and kernel == "auto":
        # the CUDA kernel's head-wise path passed tests/gpu/test_cuda_decode.py but has not run in an engine yet
        kernel = "triton"
    if kernel == "auto":
        kernel = decode_kernel(layout, group, query.dtype, query.device)[0]
    if kernel == "cuda":
        cuda_decode.decode_split(query, cache, block_table, seq_lens, layout, scale_log2=scale * LOG2E,
                                 num_splits=num_splits, split_buffers=split_buffers,
                                 num_warps=num_warps or cuda_decode.NUM_WARPS, min_ctas=min_ctas,
                                 headwise=None if headwise is None else (row_params, retrieval, retrieval_heads),
                                 tail=None if tail is None else tail_args)
    elif kernel == "triton":
        decode_splits(query, cache, block_table, seq_lens, layout, scale=scale, num_splits=num_splits,
                      split_buffers=split_buffers, headwise_args=(row_params, retrieval, retrieval_heads),
                      tail_args=tail_args, headwise=headwise is not None, num_warps=num_warps,
                      num_stages=num_stages)
    else:
        raise ValueError(f"decode kernel {kernel!r}: choose 'auto', 'cuda' or 'triton'")
    return reduce_splits(split_buffers, out, num_splits)
