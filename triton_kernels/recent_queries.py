"""Owns keeping every running request's most recent queries, which score its decode-time evictions.

A decode step has one query per request, but an eviction scored by one query would keep whatever
that single token happens to look at; Scissorhands scores with a history window of recent queries.
Each attention layer therefore keeps a ring of the last W post-RoPE queries of every request,
indexed by the request's request-state slot (stable for the request's life, unlike its batch row):

    ring  [slots + 1, W, num_heads, head_size]    query of position p in ring[slot, p % W]
                                                  (the last slot takes CUDA-graph padding rows)

`write_recent_queries` runs in every step of every layer, decode steps inside FULL CUDA graphs
included, so it reads only device tensors at fixed addresses and never syncs. Grid (rows, W):
program (r, j) copies the query of position seq_len[r] - W + j if this step computes it (a
prefill chunk of row r writes only its last W queries, so no two programs write one ring entry).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _write_recent_queries_kernel(
    query_ptr, stride_qt, stride_qh, ring_ptr, stride_rs, stride_rw, stride_rh,
    slots_ptr, query_start_ptr, seq_lens_ptr,
    NUM_HEADS: tl.constexpr, HEADS_POW2: tl.constexpr, HEAD_SIZE: tl.constexpr, WINDOW: tl.constexpr,
):
    row = tl.program_id(0)
    j = tl.program_id(1)
    start = tl.load(query_start_ptr + row)
    num_new = tl.load(query_start_ptr + row + 1) - start
    seq_len = tl.load(seq_lens_ptr + row)
    position = seq_len - WINDOW + j
    context = seq_len - num_new
    # padding rows have no tokens (num_new 0), so position < context for every j
    if position >= context and position >= 0:
        token = (start + position - context).to(tl.int64)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        heads = tl.arange(0, HEADS_POW2)[:, None]
        dims = tl.arange(0, HEAD_SIZE)[None, :]
        mask = heads < NUM_HEADS
        q = tl.load(query_ptr + token * stride_qt + heads * stride_qh + dims, mask=mask)
        dest = ring_ptr + slot * stride_rs + (position % WINDOW).to(tl.int64) * stride_rw
        tl.store(dest + heads * stride_rh + dims, q, mask=mask)


def recent_query_ring(max_requests: int, window: int, num_heads: int, head_size: int, dtype: torch.dtype,
                      device) -> torch.Tensor:
    """An empty ring for `max_requests` request-state slots (plus the padding slot)."""
    return torch.empty(max_requests + 1, window, num_heads, head_size, dtype=dtype, device=device)


def write_recent_queries(
    query: torch.Tensor,
    ring: torch.Tensor,
    request_slots: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    num_rows: int,
) -> None:
    """Store this step's queries among each row's last W in `ring` (module docstring).

    Args:
        query: [num_tokens, num_heads, head_size] post-RoPE, rows' tokens in batch order.
        ring: [slots + 1, W, num_heads, head_size] of query's dtype (`recent_query_ring`).
        request_slots: int32 [>= num_rows] each row's request-state slot (padding rows: the last).
        query_start_loc: int32 [num_rows + 1]; seq_lens: int32 [>= num_rows], the tokens of each
            row including this step's (the request's own count, not a compacted view's).
    """
    num_heads, head_size = query.shape[1], query.shape[2]
    window = ring.shape[1]
    if ring.shape[2:] != query.shape[1:] or ring.dtype != query.dtype or query.stride(2) != 1:
        raise ValueError(f"ring {tuple(ring.shape)} {ring.dtype} does not take queries "
                         f"{tuple(query.shape)} {query.dtype} (contiguous head_size)")
    if num_rows == 0:
        return
    _write_recent_queries_kernel[(num_rows, window)](
        query, query.stride(0), query.stride(1), ring, ring.stride(0), ring.stride(1), ring.stride(2),
        request_slots, query_start_loc, seq_lens,
        NUM_HEADS=num_heads, HEADS_POW2=triton.next_power_of_2(num_heads), HEAD_SIZE=head_size,
        WINDOW=window,
    )


def recent_queries(ring: torch.Tensor, slot: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The W queries of one request before position `seq_len`, oldest first, and their positions:
    ([W, num_heads, head_size], int64 [W]). Needs seq_len >= W, all written by that request."""
    window = ring.shape[1]
    positions = torch.arange(seq_len - window, seq_len, device=ring.device, dtype=torch.int64)
    return ring[slot, positions % window], positions
