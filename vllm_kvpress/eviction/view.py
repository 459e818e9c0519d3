"""Owns the compacted block-table view: what the attention kernels see of a compacted request.

After compaction the worker's block table still lists the freed blocks (vLLM sends only new block
ids, never the null replacements), and the scheduler may already have handed them to other
requests, so the kernels must never read those entries. Each step the metadata builder writes a
view that skips them:

    table     |k0|k1|k2|f3|f4|f5|f6|f7|t8|t9|        kept = 3, shift = 5 (freed f3..f7)
    view      |k0|k1|k2|t8|t9|..                     seq_len_view = seq_len - shift * block_size

Token j of the view is kept token j for j < kept * block_size, then tail token j - kept *
block_size; any paged kernel works on it unchanged. Keys carry RoPE already, so positions need no
renumbering, and causal masking holds because the newest tokens stay last.

Two halves: `shift_blocks` on the host (numpy, from the rows' prompt and context lengths, which
the builder has on the CPU), `write_compacted_view` on the device (torch, no host sync).
"""

import numpy as np
import torch

from vllm_kvpress.eviction.policy import Budget, Packing, freed_end, kept_blocks


def shift_blocks(prompt_lens, context_lens, budget: Budget, block_size: int,
                 packing: Packing | None = None, interval_blocks: int = 0) -> np.ndarray:
    """Freed blocks each row's view skips: `freed_end(P, context) - kept`, the blocks freed by the
    compactions that ran before this step (its context, the tokens computed before it, has passed
    their points), else 0.

    The step that completes the prompt (or reaches a decode-time eviction point) still sees the
    blocks that it compacts: it attends to them and compacts after. Rows with P = 0 (CUDA-graph
    padding) get 0.

    Args:
        prompt_lens: int [B] prompt length per row.
        context_lens: int [B] tokens computed before this step (seq_len - query_len).
        interval_blocks: decode-time eviction every this many blocks (`freed_end`); 0: prompt only.
    Returns:
        int32 [B].
    """
    prompt = np.asarray(prompt_lens, dtype=np.int64)
    end = freed_end(prompt, context_lens, budget, block_size, packing, interval_blocks)
    return (np.asarray(end) - kept_blocks(prompt, budget, block_size, packing, interval_blocks)).astype(np.int32)


def write_compacted_view(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kept_blocks: torch.Tensor,
    shift: torch.Tensor,
    out_block_table: torch.Tensor,
    out_seq_lens: torch.Tensor,
    block_size: int,
) -> None:
    """Write the view of B rows into preallocated tensors with device ops only (no host sync), so
    a captured decode graph can read it from the same addresses at every replay.

        out_block_table[i, j] = block_table[i, j]            for j < kept_blocks[i]
                              = block_table[i, j + shift[i]] otherwise (clamped to the last column)
        out_seq_lens[i]       = seq_lens[i] - shift[i] * block_size

    Args:
        block_table: int32 [B, W] physical block ids per row (the worker's table, stale ids included).
        seq_lens: int32 [B] tokens per row including this step's.
        kept_blocks: integer [B] leading blocks kept as they are (`policy.kept_blocks`); any value
            when shift is 0 (the row is copied as is).
        shift: int32 [B] freed blocks skipped after the kept ones (`shift_blocks`).
        out_block_table: int32 [B, W], written; entries past a row's view length are don't-care.
        out_seq_lens: int32 [B], written.
    All on one device. `out_*` must not alias the inputs.
    """
    width = block_table.shape[1]
    columns = torch.arange(width, device=block_table.device, dtype=torch.int64)[None, :]
    kept = kept_blocks.to(torch.int64)[:, None]
    source = torch.where(columns < kept, columns, columns + shift.to(torch.int64)[:, None])
    torch.gather(block_table, 1, source.clamp_(max=width - 1), out=out_block_table)
    torch.sub(seq_lens, shift.to(seq_lens.dtype) * block_size, out=out_seq_lens)
