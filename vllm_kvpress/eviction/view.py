"""Owns the compacted block-table view: what the attention kernels see of a compacted request.

After compaction the worker's block table still lists the freed blocks (vLLM sends only new block
ids, never the null replacements), so the kernels must never read those entries. Each step the
metadata builder writes a view that skips them:

    table     |k0|k1|k2|f3|f4|f5|f6|f7|t8|t9|        kept = 3, shift = 5 (freed f3..f7)
    view      |k0|k1|k2|t8|t9|..                     seq_len_view = seq_len - shift * block_size

Token j of the view is kept token j for j < kept * block_size, then tail token j - kept *
block_size; any paged kernel works on it unchanged. Keys carry RoPE already, so positions need no
renumbering, and causal masking holds because the newest tokens stay last.
"""

import torch


def write_compacted_view(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kept_blocks: torch.Tensor,
    shift: torch.Tensor,
    out_block_table: torch.Tensor,
    out_seq_lens: torch.Tensor,
    block_size: int,
) -> None:
    """Write the view of B rows into preallocated tensors, on the device, without a host sync
    (so a captured decode graph reads it from the same addresses at every replay).

    Args:
        block_table: int32 [B, W] physical block ids per row.
        seq_lens: int32 [B] tokens per row including this step's.
        kept_blocks: int32 [B] leading blocks kept as they are (W or more: the row is not compacted).
        shift: int32 [B] freed blocks skipped after the kept ones (0: not compacted).
        out_block_table: int32 [B, W] view, entries past a row's view length are don't-care.
        out_seq_lens: int32 [B].
    """
    width = block_table.shape[1]
    columns = torch.arange(width, device=block_table.device, dtype=torch.int64)[None, :]
    kept = kept_blocks.to(torch.int64)[:, None]
    source = torch.where(columns < kept, columns, columns + shift.to(torch.int64)[:, None])
    torch.gather(block_table, 1, source.clamp_(max=width - 1), out=out_block_table)
    torch.sub(seq_lens, shift * block_size, out=out_seq_lens)
