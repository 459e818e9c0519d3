"""Owns splitting one request's prompt into two precisions in one layer's pages (MiKV,
methods/mikv.py), on the worker, after the attention of the step that completes the prompt:

    logical blocks  |b0|b1|b2|b3|b4|b5|b6|b7|tail..
    after           |i0|i1|l0|l1|b4|b5|b6|b7|tail..     i: the important tokens, high precision
                          ^ low-precision units (mixed_layout.py), U per block
                                ^ freed by the block manager after this step; the compacted view
                                  (eviction/view.py) is |i0|i1|l0|l1|tail..

The prompt is read back from the pages (`read_pages`), the method picks each KV head's important
tokens (`split_prompt_kv`, the same choice as every eviction method's kept tokens), the write
kernel encodes them as complete high-precision blocks and the other full-block tokens as pages of
the low layout in a scratch buffer, whose units are then copied into the request's low blocks.
"""

import dataclasses

import torch

from vllm_kvpress.eviction.compaction import PromptCompaction, leading_slots, split_prompt_kv
from vllm_kvpress.eviction.policy import every_head_blocks


def compact_prompt_mixed(
    method,
    layout,
    cache: torch.Tensor,
    block_table_row: torch.Tensor,
    query: torch.Tensor,
    compaction: PromptCompaction,
    scale: float,
    *,
    power_iters: int,
) -> None:
    """Rewrite the row's full prompt blocks as important blocks then low-precision units.

    Args:
        method: the layer's `MiKV` (its budget, scorer, `low_page_layout`, `middle_packing`).
        layout: the layer's (high-precision) `PageLayout`.
        cache: this layer's pages, uint8 [num_blocks, num_kv_heads, bytes_per_head].
        block_table_row: the request's physical block ids (not the compacted view).
        query: [num_tokens, num_heads, head_size] this step's post-RoPE queries.
        compaction: the request; its `kept_blocks` are the important and low blocks together.
    """
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
    from vllm_kvpress.triton_kernels.read_pages import read_pages

    bs, num_kv_heads = layout.block_size, cache.shape[1]
    low_layout = method.low_page_layout(layout.head_size)
    packing = method.middle_packing(num_kv_heads, layout.head_size)
    important = every_head_blocks(compaction.prompt_len, method.budget, bs)
    chunks = compaction.prompt_len // bs - important
    split_blocks = method.kept_prompt_blocks(compaction.prompt_len, num_kv_heads, layout.head_size)
    if split_blocks != compaction.kept_blocks:
        raise RuntimeError(
            f"the schedule keeps {compaction.kept_blocks} blocks of a {compaction.prompt_len}-token prompt, the "
            f"split {split_blocks}: the block manager and the worker disagree"
        )
    keys, values = read_pages(cache, block_table_row, compaction.prompt_len, layout)
    high_k, high_v, low_k, low_v = split_prompt_kv(
        method, query, dataclasses.replace(compaction, kept_blocks=important), keys, values, scale, bs
    )
    slots = leading_slots(block_table_row, important * bs, bs)
    write_kv_pages(high_k.to(query.dtype), high_v.to(query.dtype), cache, slots, layout, power_iters=power_iters)
    scratch = torch.zeros(chunks, num_kv_heads, low_layout.bytes_per_head, dtype=torch.uint8, device=cache.device)
    write_kv_pages(low_k.to(query.dtype), low_v.to(query.dtype), scratch,
                   torch.arange(chunks * bs, device=cache.device), low_layout, power_iters=power_iters)
    packing.scatter_units(cache, block_table_row[important:compaction.kept_blocks], scratch)
