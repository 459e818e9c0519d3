"""Owns the exact tail: the keys of every request's newest, not yet full block, kept in the model
dtype beside the pages (KIVI's full-precision residual) when a layout has `exact_tail_keys`.

    tail  [slots + 1, num_kv_heads, block_size, head_size]   key of position p of the request in
                                                              state slot s at tail[s, :, p % block_size]
                                                              (the last slot takes CUDA-graph padding)

Why: a partial block's keys cannot be quantized per channel (that needs the whole block), and a
per-token scale fails on models whose keys have a few channels of very large magnitude (Qwen2.5:
|k| up to about 200 against about 10 elsewhere): the scale spans those channels and rounds every
other channel of the token to zero. Kept exact, the partial block costs nothing in quality, and
when it completes the write kernel quantizes it per channel from these exact values.

Indexed by the request's state slot (vLLM's V2 runner keeps a request in one slot for its whole
life, unlike its batch row), so the writers take a slot per token and the readers one per batch
row (`KVPressMetadata.token_slots`, `.request_slots`). A request's stale entries from an earlier
block, or another request's from before, are never read: readers mask by the sequence length.
"""

import torch
import triton
import triton.language as tl
from vllm_kvpress.triton_kernels.page_format import load_block_k

from vllm_kvpress.layout import PageLayout


def exact_tail_buffer(max_requests: int, num_kv_heads: int, layout: PageLayout, dtype: torch.dtype,
                      device) -> torch.Tensor:
    """A zeroed tail for `max_requests` request-state slots plus the padding slot (zeros, so that
    what a masked read loads is finite)."""
    return torch.zeros(max_requests + 1, num_kv_heads, layout.block_size, layout.head_size, dtype=dtype,
                       device=device)


def tail_arguments(tail: tuple[torch.Tensor, torch.Tensor] | None, layout: PageLayout, placeholder: torch.Tensor):
    """(tail, its slot stride, its head stride, slots) for a kernel's exact-tail arguments, checked
    against the layout; placeholders the kernel never reads (EXACT_TAIL off) when `tail` is None.

    Args:
        tail: (buffer from `exact_tail_buffer`, int32 slots: one per batch row for the readers, one
            per input token for the writer), or None.
    """
    if layout.exact_tail_keys != (tail is not None):
        need = "needs an" if layout.exact_tail_keys else "takes no"
        raise ValueError(f"a layout with exact_tail_keys={layout.exact_tail_keys} {need} exact tail buffer")
    if tail is None:
        return placeholder, 0, 0, placeholder
    from vllm_kvpress.triton_kernels.checks import check_tensor

    buffer, slots = tail
    check_tensor("exact tail", buffer, dtype=(torch.float16, torch.bfloat16), ndim=4,
                 shape=(None, None, layout.block_size, layout.head_size))
    check_tensor("tail slots", slots, dtype=torch.int32, ndim=1)
    if buffer.stride(3) != 1 or buffer.stride(2) != layout.head_size:
        raise ValueError("the exact tail must be contiguous within a slot and head")
    return buffer, buffer.stride(0), buffer.stride(1), slots


@triton.jit
def tail_rows(tail_ptr, stride_ts, stride_th, slot, kv_head):
    """Pointer to row 0 of the (slot, KV head) tail; row j (block offset j) is HEAD_SIZE elements on."""
    return tail_ptr + slot.to(tl.int64) * stride_ts + kv_head * stride_th


@triton.jit
def load_tail_k(tail_ptr, stride_ts, stride_th, slot, kv_head, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr):
    """The exact K of one head's partial block, fp32 [BLOCK_SIZE, HEAD_SIZE] (rows past the
    sequence's tokens hold stale values: callers mask them)."""
    rows = tail_rows(tail_ptr, stride_ts, stride_th, slot, kv_head)
    offs = tl.arange(0, BLOCK_SIZE)[:, None] * HEAD_SIZE + tl.arange(0, HEAD_SIZE)[None, :]
    return tl.load(rows + offs).to(tl.float32)


@triton.jit
def load_stored_k(page, complete, tail_ptr, stride_ts, stride_th, tail_slot, kv_head, EXACT_TAIL: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, K_BITS: tl.constexpr,
                  K_STAGE_GROUP: tl.constexpr, K_CODES_OFF: tl.constexpr, K_META_OFF: tl.constexpr,
                  K_LOWRANK_OFF: tl.constexpr, K_SPARSE_OFF: tl.constexpr, RANK: tl.constexpr,
                  NUM_OUTLIERS: tl.constexpr):
    """The stored K of one head's block, fp32 [BLOCK_SIZE, HEAD_SIZE]: `load_block_k` of its page,
    except a partial block's under an exact tail, which the tail holds."""
    if EXACT_TAIL:
        if complete:
            k = load_block_k(page, True, BLOCK_SIZE, HEAD_SIZE, K_BITS, K_STAGE_GROUP, K_CODES_OFF, K_META_OFF,
                             K_LOWRANK_OFF, K_SPARSE_OFF, RANK, NUM_OUTLIERS)
        else:
            k = load_tail_k(tail_ptr, stride_ts, stride_th, tail_slot, kv_head, BLOCK_SIZE, HEAD_SIZE)
    else:
        k = load_block_k(page, complete, BLOCK_SIZE, HEAD_SIZE, K_BITS, K_STAGE_GROUP, K_CODES_OFF, K_META_OFF,
                         K_LOWRANK_OFF, K_SPARSE_OFF, RANK, NUM_OUTLIERS)
    return k
