"""Owns reference attention: dense causal GQA, and paged attention over any page reader."""

from collections.abc import Callable

import torch


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries are the last `q_len` positions of the `kv_len` keys (causal, GQA any group size).

    q [q_len, num_heads, head_size], k/v [kv_len, num_kv_heads, head_size] -> [q_len, num_heads, head_size] fp32.
    """
    q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    k_pos = torch.arange(kv_len, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def paged_attention(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    read_sequence: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    decode_query_len: int = 1,
) -> torch.Tensor:
    """Attention of a vLLM batch whose K/V were already written to the cache.

    Args:
        q, key, value: [num_tokens, heads, head_size] of the batch (key/value: the fresh K/V).
        query_start_loc: [num_seqs + 1] offsets of each sequence's queries.
        seq_lens: [num_seqs] tokens per sequence including this step's.
        read_sequence: (seq index, seq_len) -> K, V [seq_len, num_kv_heads, head_size] from pages.
        decode_query_len: sequences with at most this many queries read everything from pages
            (decode); longer ones (prefill chunks) use their fresh bf16 K/V for their own tokens.
    Returns:
        [num_tokens, num_heads, head_size] fp32.
    """
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        k_all, v_all = read_sequence(i, seq_len)
        if end - start > decode_query_len:
            k_all, v_all = k_all.clone(), v_all.clone()
            k_all[seq_len - (end - start) :] = key[start:end].float()
            v_all[seq_len - (end - start) :] = value[start:end].float()
        out[start:end] = causal_attention(q[start:end], k_all, v_all, scale)
    return out
