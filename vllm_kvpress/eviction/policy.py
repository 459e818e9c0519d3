"""Owns the kept-block rule: how many leading blocks of a request's prompt survive compaction.

The scheduler's block manager (which frees blocks), the worker (which compacts tokens into the
first blocks) and the metadata builder (which hides the freed blocks from the kernels) must agree
on this number exactly for every request, on every rank. They all call `kept_prompt_blocks`, which
depends only on the prompt length and the method's settings.

    prompt:  |b0|b1|b2|b3|b4|b5|b6|b7|b8|b9|tail..
    after:   |k0|k1|k2|  freed (returned to vLLM)  |tail..     kept = 3 blocks
                                                    ^ block prompt_len // block_size, kept as is:
                                                      the last partial prompt block + decode tokens
"""

import numpy as np

Budget = int | float
"""A token count (int) or a fraction of the prompt (float): the two are told apart by type."""


def budget_tokens(prompt_len, budget: Budget):
    """Prompt tokens a request keeps: `budget` tokens (int), or that fraction of the prompt (float
    in (0, 1)), rounded up. Works on ints and on numpy int arrays (float64 math on both, so the
    scheduler and the workers round identically)."""
    if isinstance(budget, float):
        return np.ceil(np.asarray(prompt_len, dtype=np.float64) * budget).astype(np.int64)
    return np.full_like(np.asarray(prompt_len, dtype=np.int64), budget)


def kept_prompt_blocks(prompt_len, budget: Budget, block_size: int):
    """Leading prompt blocks that hold the kept tokens after compaction; equal to the number of full
    prompt blocks (`prompt_len // block_size`) when the budget keeps everything (no compaction)."""
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    full_blocks = prompt_len // block_size
    wanted = -(-budget_tokens(prompt_len, budget) // block_size)
    kept = np.minimum(full_blocks, wanted)
    return int(kept) if kept.ndim == 0 else kept


def compacts(prompt_len, budget: Budget, block_size: int):
    """Whether a request with this prompt is compacted at all (some prompt blocks are freed)."""
    prompt_len = np.asarray(prompt_len, dtype=np.int64)
    result = kept_prompt_blocks(prompt_len, budget, block_size) < prompt_len // block_size
    return bool(result) if np.ndim(result) == 0 else result
