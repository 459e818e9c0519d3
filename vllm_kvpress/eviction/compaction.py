"""Owns compacting one request's prompt in one layer's pages: score the stored tokens, keep the
method's choice and rewrite it into the request's first blocks.

Runs in the attention layer's forward, after the attention of the step whose tokens complete the
prompt (the compaction step), so that step still attends to every token:

    logical blocks  |b0|b1|b2|b3|b4|b5|b6|b7|tail..      (tail = block P // block_size)
    after           |k0|k1|k2|b3|b4|b5|b6|b7|tail..      k = kept tokens, re-packed per head
                              ^ freed by the scheduler's block manager after this step; every later
                                step sees |k0|k1|k2|tail.. through the compacted block-table view

The kept tokens are read back (dequantized) from the pages, gathered per KV head and written again
as complete blocks with the same cache-write kernel as fresh tokens, so the kernels need nothing
new to read them. Positions are not renumbered: keys are stored after RoPE.

Decode-time eviction (`decode_interval`) compacts again, in the step that reaches an eviction point
(`policy.freed_end`), over what that step's compacted view holds:

    view     |k0|k1|k2|t0|t1|t2|t3|..       candidates: the kept blocks and the T blocks since
    after    |k0'|k1'|k2'|                  the method's choice among them, in the kept blocks
                         ^ the T blocks are freed after this step; the next view starts after them

scored by the request's last `decode_observation_window` queries (triton_kernels/recent_queries.py).
"""

from dataclasses import dataclass

import torch

from vllm_kvpress.eviction.scoring import select_kept_tokens


@dataclass(frozen=True)
class PromptCompaction:
    """A request whose prompt completes in this step and whose pages are compacted after it."""

    row: int
    """Row of the request in the batch."""
    prompt_len: int
    query_start: int
    """Index of the row's first query token in this step's batch."""
    context_len: int
    """Tokens of the request computed before this step."""
    kept_blocks: int
    """Leading blocks that hold the kept tokens (`EvictingMethod.kept_prompt_blocks`, methods/eviction.py)."""


@dataclass(frozen=True)
class RecentCompaction:
    """A request that reaches a decode-time eviction point in this step (`policy.freed_end`) and
    whose view is compacted after it: the candidates are its view's first `num_candidates` tokens
    (the kept blocks and the complete blocks since the last compaction)."""

    row: int
    """Row of the request in the batch."""
    request_slot: int
    """Its request-state slot, under which its recent queries are kept."""
    seq_len: int
    """Tokens of the request including this step's (positions, not the view's count)."""
    view_len: int
    """Tokens of its compacted view in this step (seq_len minus the tokens freed before it)."""
    num_candidates: int
    kept_blocks: int
    """Leading view blocks that hold the kept tokens (`policy.kept_blocks`)."""


def leading_slots(block_ids: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """int64 [num_tokens]: the cache slots of the first `num_tokens` tokens of a row whose blocks
    are `block_ids` (a block-table row or a compacted view's), where compaction rewrites them."""
    token = torch.arange(num_tokens, device=block_ids.device)
    return block_ids[token // block_size].to(torch.int64) * block_size + token % block_size


def gather_kept(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of the kept tokens, per KV head: keys/values [P, Hkv, D], kept [Hkv, n] -> [n, Hkv, D]."""
    index = kept.t()[:, :, None].expand(-1, -1, keys.shape[-1])
    return keys.gather(0, index), values.gather(0, index)


def window_queries(query: torch.Tensor, compaction: PromptCompaction, observation_window: int):
    """The last prompt queries of this step's chunk and their positions: ([w, H, D], [w] int64)."""
    last = compaction.prompt_len  # the chunk may run past the prompt (re-prefill after preemption)
    w = min(observation_window, last - compaction.context_len)
    first = compaction.query_start + (last - w - compaction.context_len)
    positions = torch.arange(last - w, last, device=query.device, dtype=torch.int64)
    return query[first : first + w], positions


def kept_prompt_kv(
    config,
    query: torch.Tensor,
    compaction: PromptCompaction,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's choice of the prompt's tokens: the chunk's last queries score every prompt key
    (`select_kept_tokens`), and each KV head's kept K/V are gathered, [kept_blocks * block_size,
    Hkv, D] each: the worker's (`compact_prompt`); the reference engine takes its two steps
    (`kept_prompt_tokens`, `gather_kept`), which keeps the positions.

    Args:
        query: [num_tokens, num_heads, head_size] the step's post-RoPE queries (`window_queries`).
        keys, values: [prompt_len, num_kv_heads, head_size] every prompt token, dequantized.
    """
    return gather_kept(keys, values, kept_prompt_tokens(config, query, compaction, keys, scale, block_size))


def kept_prompt_tokens(config, query, compaction: PromptCompaction, keys, scale: float, block_size: int):
    """int64 [num_kv_heads, kept_blocks * block_size]: the method's choice among the full prompt
    blocks' tokens, ascending per KV head (`select_kept_tokens`)."""
    queries, positions = window_queries(query, compaction, config.observation_window)
    num_candidates = compaction.prompt_len // block_size * block_size
    return select_kept_tokens(
        config, queries.float(), positions, keys, scale, num_candidates, compaction.kept_blocks * block_size
    )


def split_prompt_kv(
    config,
    query: torch.Tensor,
    compaction: PromptCompaction,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed precision (methods/mikv.py): the method's important tokens, as `kept_prompt_kv`
    chooses them, and every other token of the full prompt blocks, each per KV head in position
    order: important K, V [kept_blocks * block_size, Hkv, D], demoted K, V [(P // block_size -
    kept_blocks) * block_size, Hkv, D]."""
    kept = kept_prompt_tokens(config, query, compaction, keys, scale, block_size)
    num_kv_heads, num_candidates = keys.shape[1], compaction.prompt_len // block_size * block_size
    demoted = torch.ones(num_kv_heads, num_candidates, dtype=torch.bool, device=keys.device)
    demoted.scatter_(1, kept, False)
    # nonzero walks row-major: each head's demoted positions, ascending
    demoted = demoted.nonzero()[:, 1].reshape(num_kv_heads, -1)
    return (*gather_kept(keys, values, kept), *gather_kept(keys, values, demoted))


def compact_prompt(
    config,
    layout,
    cache: torch.Tensor,
    block_table_row: torch.Tensor,
    query: torch.Tensor,
    compaction: PromptCompaction,
    scale: float,
    *,
    power_iters: int,
) -> None:
    """Keep `config`'s choice of the prompt's tokens in the first `kept_blocks` blocks of the row.

    Args:
        config: the layer's `TokenEviction` method (methods/eviction.py).
        layout: the layer's `PageLayout`.
        cache: this layer's pages, uint8 [num_blocks, num_kv_heads, bytes_per_head].
        block_table_row: the request's physical block ids (not the compacted view).
        query: [num_tokens, num_heads, head_size] this step's post-RoPE queries.
    """
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
    from vllm_kvpress.triton_kernels.read_pages import read_pages

    bs = layout.block_size
    keys, values = read_pages(cache, block_table_row, compaction.prompt_len, layout)
    kept_k, kept_v = kept_prompt_kv(config, query, compaction, keys, values, scale, bs)
    slots = leading_slots(block_table_row, compaction.kept_blocks * bs, bs)
    write_kv_pages(kept_k.to(query.dtype), kept_v.to(query.dtype), cache, slots, layout, power_iters=power_iters)


def kept_recent_kv(
    config,
    queries: torch.Tensor,
    positions: torch.Tensor,
    compaction: RecentCompaction,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's choice among a view's candidates: [kept_blocks * block_size, Hkv, D] K and V.
    Shared by the worker (`compact_recent`) and the reference engine.

    Args:
        queries: [w, num_heads, head_size] the request's last post-RoPE queries, at `positions`.
        keys, values: [view_len, num_kv_heads, head_size] the view's tokens, dequantized.
    """
    # the view drops whole blocks before the recent queries: their positions minus the freed
    # tokens are view indices, and causal masking in view indices is the original one
    view_positions = positions - (compaction.seq_len - compaction.view_len)
    kept = select_kept_tokens(config, queries.float(), view_positions, keys, scale, compaction.num_candidates,
                              compaction.kept_blocks * block_size)
    return gather_kept(keys, values, kept)


def compact_recent(
    config,
    layout,
    cache: torch.Tensor,
    view_row: torch.Tensor,
    ring: torch.Tensor,
    compaction: RecentCompaction,
    scale: float,
    *,
    power_iters: int,
) -> None:
    """Keep `config`'s choice of a view's candidates in its first `kept_blocks` blocks.

    Args:
        view_row: the request's row of this step's compacted view (kept blocks, then the blocks
            since the last compaction).
        ring: this layer's recent queries (`triton_kernels.recent_queries`), this step's included.
    """
    from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
    from vllm_kvpress.triton_kernels.read_pages import read_pages
    from vllm_kvpress.triton_kernels.recent_queries import recent_queries

    bs = layout.block_size
    keys, values = read_pages(cache, view_row, compaction.view_len, layout)
    queries, positions = recent_queries(ring, compaction.request_slot, compaction.seq_len)
    kept_k, kept_v = kept_recent_kv(config, queries, positions, compaction, keys, values, scale, bs)
    slots = leading_slots(view_row, compaction.kept_blocks * bs, bs)
    write_kv_pages(kept_k.to(ring.dtype), kept_v.to(ring.dtype), cache, slots, layout, power_iters=power_iters)
