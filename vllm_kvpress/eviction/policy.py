"""Owns the eviction schedule: how many leading blocks of a request survive, and which blocks
after them are freed once the request has computed a given number of tokens.

The scheduler's block manager (which frees blocks), the worker (which compacts tokens into the
first blocks) and the metadata builder (which hides the freed blocks from the kernels) must agree
on these numbers exactly for every request, on every rank. They all call `kept_prompt_blocks` and
`freed_end`, which depend only on the prompt length, the tokens computed and the method's settings.

    prompt:  |b0|b1|b2|b3|b4|b5|b6|b7|b8|b9|tail..
    after:   |k0|k1|k2|  freed (returned to vLLM)  |tail..     kept = 3 blocks
                                                    ^ block F = prompt_len // block_size, kept as
                                                      is: the last partial prompt block + decode

With decode-time eviction (`interval_blocks` T > 0), every time T more blocks after F are complete
(the request has computed (F + m T) * block_size tokens, m = 1, 2, ...), the kept blocks and those
T blocks are scored again and the choice is compacted into the kept blocks; blocks [kept, F + m T)
are then all freed, so a request holds kept + at most T + 1 blocks however long it generates:

    after round m:  |k0|k1|k2|  freed  ...................  |F+mT|F+mT+1..
"""

from typing import Protocol

import numpy as np

from vllm_kvpress.headwise_layout import HeadPacking

Budget = int | float
"""A token count (int) or a fraction of the prompt (float): the two are told apart by type."""


class Packing(Protocol):
    """Blocks a compacted prompt keeps after its K every-head blocks, for the tokens that stay
    in another form: razor's retrieval-head chunks (`HeadPacking`), MiKV's low-precision chunks
    (`mixed_layout.LowPrecisionPacking`). The schedule needs only their count."""

    def middle_blocks(self, prompt_blocks, kept_blocks): ...


__all__ = ["Budget", "HeadPacking", "Packing", "budget_tokens", "compacts", "every_head_blocks", "freed_end",
           "kept_blocks", "kept_prompt_blocks"]


def budget_tokens(prompt_len, budget: Budget):
    """Prompt tokens a request keeps: `budget` tokens (int), or that fraction of the prompt (float
    in (0, 1)), rounded up. Works on ints and on numpy int arrays (float64 math on both, so the
    scheduler and the workers round identically)."""
    if isinstance(budget, float):
        return np.ceil(np.asarray(prompt_len, dtype=np.float64) * budget).astype(np.int64)
    return np.full_like(np.asarray(prompt_len, dtype=np.int64), budget)


def every_head_blocks(prompt_len, budget: Budget, block_size: int):
    """Leading prompt blocks every KV head keeps: the budget's tokens in whole blocks, at most the
    full prompt blocks (`prompt_len // block_size`)."""
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    kept = np.minimum(prompt_len // block_size, -(-budget_tokens(prompt_len, budget) // block_size))
    return int(kept) if kept.ndim == 0 else kept


def kept_prompt_blocks(prompt_len, budget: Budget, block_size: int, packing: Packing | None = None):
    """Leading prompt blocks that hold the kept tokens after compaction (with `packing`, its
    middle blocks too: razor's packed retrieval chunks, MiKV's low-precision chunks); equal to the
    number of full prompt blocks when nothing is freed (no compaction)."""
    kept = every_head_blocks(prompt_len, budget, block_size)
    if packing is not None:
        full = np.asarray(prompt_len, dtype=np.int64) // block_size
        kept = kept + packing.middle_blocks(full, kept)
    return int(kept) if np.ndim(kept) == 0 else np.asarray(kept)


def kept_blocks(prompt_len, budget: Budget, block_size: int, packing: Packing | None = None,
                interval_blocks: int = 0):
    """Leading blocks a request keeps while later ones are freed: `kept_prompt_blocks`, and with
    decode-time eviction (`interval_blocks` > 0) the budget's whole blocks even where the prompt is
    shorter: its decode tokens fill them before a round frees anything, so the budget, not the
    prompt, bounds what a request keeps."""
    if not interval_blocks:
        return kept_prompt_blocks(prompt_len, budget, block_size, packing)
    if packing is not None:
        raise ValueError("decode-time eviction does not pack heads (RazorAttention evicts once, after the prompt)")
    kept = -(-budget_tokens(prompt_len, budget) // block_size)
    return int(kept) if np.ndim(kept) == 0 else np.asarray(kept)


def compacts(prompt_len, budget: Budget, block_size: int, packing: Packing | None = None):
    """Whether a request with this prompt is compacted at all (some prompt blocks are freed)."""
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    result = kept_prompt_blocks(prompt_len, budget, block_size, packing) < prompt_len // block_size
    return bool(result) if np.ndim(result) == 0 else result


def freed_end(prompt_len, num_tokens, budget: Budget, block_size: int, packing: Packing | None = None,
              interval_blocks: int = 0):
    """End E of the freed blocks [kept, E) of a request that has computed `num_tokens` tokens
    (kept: `kept_blocks`); E = kept where nothing is freed. Non-decreasing in num_tokens:

        num_tokens < P                      kept              (the prompt is not complete)
        P <= num_tokens < (F + T) * bs      max(F, kept)      (the prompt's compaction)
        (F + m T) * bs <= num_tokens < ...  max(F + m T, kept) (decode round m >= 1, with T > 0)

    with F = P // block_size and T = interval_blocks. Rows with P = 0 (CUDA-graph padding) free
    nothing (E = kept).
    Works on ints and numpy int arrays."""
    prompt = np.asarray(prompt_len, dtype=np.int64)
    tokens = np.asarray(num_tokens, dtype=np.int64)
    first_tail = prompt // block_size
    kept = kept_blocks(prompt, budget, block_size, packing, interval_blocks)
    end = np.where(tokens >= prompt, first_tail, 0)
    if interval_blocks:
        rounds = np.maximum(tokens // block_size - first_tail, 0) // interval_blocks
        end = np.where((rounds >= 1) & (prompt > 0), first_tail + rounds * interval_blocks, end)
    end = np.maximum(end, kept)
    return int(end) if end.ndim == 0 else end
