"""Owns prefill attention through vLLM's FlashAttention: the chunk's queries over its compressed
context (dequantized once per step into a bf16 workspace) and its own fresh K/V.

    workspace  |--- seq 0: context (pages) ---|- chunk -|--- seq 1: context ---|- chunk -|...
    queries                                   |- chunk -|                      |- chunk -|

FlashAttention's causal mask is aligned to the bottom right when a sequence has more keys than
queries, which is exactly "every context token plus the chunk's own earlier tokens". The chunk's
keys are the exact bf16 projections (as in the Triton prefill kernel, KIVI and GEAR), the context
is what the decode kernel reads. A chunk without context (a prompt's first chunk, the common case)
attends to the fresh K/V directly, with no workspace.

Why not dequantize inside the attention kernel: the Triton prefill kernel dequantizes every
context block once per tile of query tokens, and its matmuls run far below FlashAttention's; here
each context block is read once per step and the attention is FlashAttention 3 on Hopper.

The host half (`plan_flash_prefill`) runs once per step in the metadata builder, on the CPU copies
of the batch's lengths; prefill steps are never captured in CUDA graphs, so the workspace is
allocated per step.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from vllm_kvpress.backend.host_copy import to_device
from vllm_kvpress.layout import PageLayout

logger = logging.getLogger("vllm.kvpress")
_first_sparse_logged = False


@dataclass(frozen=True)
class FlashPrefillPlan:
    """Where each prefill sequence's keys sit in FlashAttention's varlen layout."""

    first_token: int
    """Index of the first prefill query in the batch (decodes come first)."""
    num_tokens: int
    """Prefill queries of the batch."""
    cu_seqlens_q: torch.Tensor
    """int32 [num_seqs + 1] query offsets relative to `first_token`."""
    max_seqlen_q: int
    cu_seqlens_k: torch.Tensor
    """int32 [num_seqs + 1] key offsets: equal to cu_seqlens_q without context, else into the
    workspace of `total_keys` tokens (each sequence's context, then its chunk)."""
    max_seqlen_k: int
    total_keys: int
    has_context: bool
    context_lens: torch.Tensor
    """int32 [num_seqs] stored tokens attended from the pages."""
    max_context_blocks: int
    fresh_dest: torch.Tensor
    """int64 [num_tokens] workspace row of each prefill query's own K/V."""
    fa_version: int | None = None
    """vLLM's FlashAttention version to run (`flash_attention_version`)."""
    sparse_seqs: tuple[int, ...] = ()
    """The plan's sequences (0-based among its own) whose chunk attends to part of its context only
    (the method's `sparse_prefill`, zipvl): `sparse_keys_values` picks that part per layer."""


def plan_flash_prefill(
    query_start_loc: np.ndarray, seq_lens: np.ndarray, first_seq: int, num_seqs: int, block_size: int,
    device: torch.device, fa_version: int | None = None, sparse_seqs: tuple[int, ...] = (),
) -> FlashPrefillPlan:
    """The varlen layout of rows `first_seq .. first_seq + num_seqs - 1`.

    Args:
        query_start_loc: int [>= first_seq + num_seqs + 1] query offsets of the batch's rows (CPU).
        seq_lens: int [>= first_seq + num_seqs] tokens per row including this step's, as the
            kernels see them (the compacted view for eviction methods).
        sparse_seqs: the plan's sequences (0-based) that attend to part of their context only.
    """
    starts = np.asarray(query_start_loc[first_seq : first_seq + num_seqs + 1], dtype=np.int64)
    query_lens = np.diff(starts)
    seq = np.asarray(seq_lens[first_seq : first_seq + num_seqs], dtype=np.int64)
    context = seq - query_lens
    cu_q = starts - starts[0]
    has_context = bool((context > 0).any())
    if has_context:
        cu_k = np.concatenate([[0], np.cumsum(seq)])
        # chunk token j of sequence i goes after that sequence's context
        fresh_dest = np.repeat(cu_k[:-1] + context - cu_q[:-1], query_lens) + np.arange(cu_q[-1])
    else:
        cu_k, fresh_dest = cu_q, np.zeros(0, dtype=np.int64)

    return FlashPrefillPlan(
        first_token=int(starts[0]),
        num_tokens=int(cu_q[-1]),
        cu_seqlens_q=to_device(cu_q, np.int32, device),
        max_seqlen_q=int(query_lens.max(initial=0)),
        cu_seqlens_k=to_device(cu_k, np.int32, device),
        max_seqlen_k=int(seq.max(initial=0)),
        total_keys=int(cu_k[-1]),
        has_context=has_context,
        context_lens=to_device(context, np.int32, device),
        max_context_blocks=int(-(-context.max(initial=0) // block_size)),
        fresh_dest=to_device(fresh_dest, np.int64, device),
        fa_version=fa_version,
        sparse_seqs=tuple(i for i in sparse_seqs if context[i] > 0),
    )


def prefill_keys_values(
    plan: FlashPrefillPlan,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    first_seq: int,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
    mixed: tuple[torch.Tensor, PageLayout, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [plan.total_keys, num_kv_heads, head_size] in the plan's varlen layout: the fresh
    projections themselves when no sequence has context, else a workspace of dequantized context
    and fresh chunk (`tail`, `mixed`: the exact tail and each batch row's slot, mixed-precision
    rows, as in `read_pages_into`)."""
    from vllm_kvpress.triton_kernels.read_pages import read_pages_into

    fresh = slice(plan.first_token, plan.first_token + plan.num_tokens)
    if not plan.has_context:
        return key[fresh], value[fresh]
    k_ws = key.new_empty(plan.total_keys, key.shape[1], key.shape[2])
    v_ws = torch.empty_like(k_ws)
    read_pages_into(cache, block_table, plan.context_lens, seq_lens, plan.cu_seqlens_k, k_ws, v_ws, layout,
                    first_row=first_seq, max_blocks=plan.max_context_blocks, tail=tail, mixed=mixed)
    k_ws.index_copy_(0, plan.fresh_dest, key[fresh])
    v_ws.index_copy_(0, plan.fresh_dest, value[fresh])
    return k_ws, v_ws


def sparse_keys_values(
    plan: FlashPrefillPlan, query: torch.Tensor, k_ws: torch.Tensor, v_ws: torch.Tensor,
    prefill_context: Callable[..., tuple[torch.Tensor, torch.Tensor, int]], scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The workspace with each of `plan.sparse_seqs`'s context replaced by the part its chunk
    attends to (`prefill_context`, the method's: K, V and a count from the chunk's queries, its
    context and chunk K/V): (K, V, cu_seqlens_k, max_seqlen_k) for FlashAttention. The counts are
    read on the host: a prefill step runs eagerly, never in a CUDA graph.

    Args:
        query: [plan.num_tokens, num_heads, head_size] the plan's prefill queries.
        k_ws, v_ws: [plan.total_keys, num_kv_heads, head_size] from `prefill_keys_values`.
    """
    cu_q, cu_k = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    context = plan.context_lens.tolist()
    keys, values, lengths = [], [], []
    for i in range(len(cu_q) - 1):
        k_seq, v_seq = k_ws[cu_k[i] : cu_k[i + 1]], v_ws[cu_k[i] : cu_k[i + 1]]
        if i in plan.sparse_seqs:
            k_kept, v_kept, count = prefill_context(query[cu_q[i] : cu_q[i + 1]], k_seq, v_seq, context[i], scale)
            _log_first_sparse_chunk(count, context[i])
            k_seq = torch.cat([k_kept.to(k_seq.dtype), k_seq[context[i] :]])
            v_seq = torch.cat([v_kept.to(v_seq.dtype), v_seq[context[i] :]])
        keys.append(k_seq)
        values.append(v_seq)
        lengths.append(k_seq.shape[0])
    cu_seqlens_k = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=k_ws.device)
    return torch.cat(keys), torch.cat(values), cu_seqlens_k, max(lengths)


def _log_first_sparse_chunk(count: int, context_len: int) -> None:
    """Say once per process that the sparse prefill is at work (a serving log shows it took effect)."""
    global _first_sparse_logged
    if not _first_sparse_logged:
        _first_sparse_logged = True
        logger.info("vllm-kvpress: sparse prefill: a chunk attended to %d of its %d context tokens", count,
                    context_len)


def flash_attention_version() -> int | None:
    """vLLM's FlashAttention version for this GPU (3 on Hopper), or None where it has none (no CUDA,
    or a build without its kernels): the Triton prefill kernel serves there."""
    if not torch.cuda.is_available():
        return None
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version()


def flash_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: PageLayout,
    plan: FlashPrefillPlan,
    *,
    scale: float,
    first_seq: int,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
    mixed: tuple[torch.Tensor, PageLayout, int] | None = None,
    prefill_context: Callable[..., tuple[torch.Tensor, torch.Tensor, int]] | None = None,
) -> torch.Tensor:
    """Causal attention of the plan's prefill queries, written into their rows of `out`.

    Args: as `prefill_attention` (query/key/value the batch's fresh projections, out like query);
        `prefill_context`: the method's choice of context for `plan.sparse_seqs`.
    """
    if plan.fa_version is None:  # FlashAttention's own default (2) may not be built for this GPU
        raise ValueError("the prefill plan names no FlashAttention version (plan_flash_prefill(fa_version=...))")
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    k, v = prefill_keys_values(plan, key, value, cache, block_table, seq_lens, layout, first_seq, tail, mixed)
    rows = slice(plan.first_token, plan.first_token + plan.num_tokens)
    cu_seqlens_k, max_seqlen_k = plan.cu_seqlens_k, plan.max_seqlen_k
    if plan.sparse_seqs:
        if prefill_context is None:
            raise ValueError("the plan has sparse sequences but no prefill_context to choose their context")
        k, v, cu_seqlens_k, max_seqlen_k = sparse_keys_values(plan, query[rows], k, v, prefill_context, scale)
    flash_attn_varlen_func(
        query[rows], k, v, max_seqlen_q=plan.max_seqlen_q, cu_seqlens_q=plan.cu_seqlens_q,
        max_seqlen_k=max_seqlen_k, cu_seqlens_k=cu_seqlens_k, softmax_scale=scale, causal=True,
        out=out[rows], fa_version=plan.fa_version,
    )
    return out
