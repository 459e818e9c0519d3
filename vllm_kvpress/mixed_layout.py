"""Owns the geometry of mixed-precision pages (MiKV): where a request's low-precision tokens sit
when its important tokens keep high-precision pages.

A vLLM block holds every KV head of `block_size` tokens in the high-precision layout, H heads of
`high.bytes_per_head` bytes in one contiguous row. One KV head's chunk of `block_size` tokens in the
low-precision layout (`low`: the same quantizer at fewer bits) takes `low.bytes_per_head` bytes, so
U = floor(H * high.bytes_per_head / low.bytes_per_head) such *units* fit in the bytes of one block.
After compaction a request's view is

    | important: K blocks | low: L blocks                          | tail ...
      every head, high      units, U per block, packed end to end    every head, high: the last
      precision: the        (a unit never straddles two blocks;      partial prompt block and the
      `budget` tokens       the bytes after the U-th are unused)     generated tokens

Every KV head keeps the same number n = P // block_size - K of low chunks (its full-block prompt
tokens that are not important), so L = ceil(n H / U) blocks replace n, and blocks [K + L, P //
block_size) go back to vLLM. Unit u = c * H + h holds chunk c of KV head h, at byte offset
(u % U) * low.bytes_per_head of view block K + u // U. A block's bytes are one row because vLLM's
cache tensor is [num_blocks, H, bytes_per_head], contiguous: packing units across the head
boundary of a row is what lets U exceed H times the per-head ratio's floor.

Why a unit is a whole low-precision page of one head and not a block of 4x the tokens: the
low-precision chunk then is exactly a page of the low layout (`layout.PageLayout`), read and
written by the codecs and kernels that already read such pages; only its address changes. What
it costs is the metadata: per-channel K scales per chunk and per-token V scales do not shrink with
the bits, so a 2-bit chunk is 3.4x (head 64) to 3.5x (head 128) smaller than an 8-bit one, not 4x.
"""

from dataclasses import dataclass

import numpy as np

from vllm_kvpress.layout import PageLayout


@dataclass(frozen=True)
class LowPrecisionPacking:
    """How one layer's low-precision chunks pack into blocks (module docstring)."""

    units_per_block: int
    """U: low-precision chunks of one KV head that fit in the bytes of one block."""
    kv_heads: int
    """H: KV heads per layer."""
    unit_bytes: int
    """Bytes of one unit: the low layout's `bytes_per_head`."""

    @classmethod
    def for_layouts(cls, high: PageLayout, low: PageLayout, kv_heads: int) -> "LowPrecisionPacking":
        if high.block_size != low.block_size or high.head_size != low.head_size:
            raise ValueError("high and low precision pages must share block_size and head_size")
        return cls(kv_heads * high.bytes_per_head // low.bytes_per_head, kv_heads, low.bytes_per_head)

    @property
    def saves_blocks(self) -> bool:
        """Whether low-precision chunks take fewer blocks than high-precision ones would."""
        return self.units_per_block > self.kv_heads

    def middle_blocks(self, prompt_blocks, kept_blocks):
        """L: view blocks holding the low-precision chunks of the prompt's full blocks after the
        `kept_blocks` important ones (int or int array; 0 where nothing is demoted)."""
        chunks = np.maximum(np.asarray(prompt_blocks, dtype=np.int64) - kept_blocks, 0)
        blocks = -(-chunks * self.kv_heads // self.units_per_block)
        return int(blocks) if np.ndim(blocks) == 0 else blocks

    def unit_location(self, chunk: int, head: int, kept_blocks: int) -> tuple[int, int]:
        """(view block, byte offset in the block's row) of low chunk `chunk` of KV head `head`."""
        unit = chunk * self.kv_heads + head
        return kept_blocks + unit // self.units_per_block, (unit % self.units_per_block) * self.unit_bytes

    # Moving whole units (torch tensors on any device; this module imports no torch): the worker,
    # which encodes the chunks with the write kernel, and the reference codec share these.
    def scatter_units(self, cache, block_ids, chunks) -> None:
        """Place `chunks` (uint8 [n, H, unit_bytes], pages of the low layout; chunk c of head h is
        unit c * H + h) into the unit slots of the blocks `block_ids` (int [>= middle_blocks(n, 0)],
        physical ids in view order) of `cache` (uint8 [num_blocks, H, bytes_per_head], contiguous)."""
        num_blocks = self.middle_blocks(chunks.shape[0], 0)
        used = self.units_per_block * self.unit_bytes
        units = chunks.new_zeros(num_blocks * self.units_per_block, self.unit_bytes)
        units[: chunks.shape[0] * self.kv_heads] = chunks.reshape(-1, self.unit_bytes)
        rows = cache.view(cache.shape[0], -1)
        rows[block_ids[:num_blocks].long(), :used] = units.reshape(num_blocks, used)

    def gather_units(self, cache, block_ids, num_chunks: int):
        """The inverse of `scatter_units`: uint8 [num_chunks, H, unit_bytes], pages of the low layout."""
        num_blocks = self.middle_blocks(num_chunks, 0)
        used = self.units_per_block * self.unit_bytes
        rows = cache.view(cache.shape[0], -1)[block_ids[:num_blocks].long(), :used]
        units = rows.reshape(-1, self.unit_bytes)[: num_chunks * self.kv_heads]
        return units.reshape(num_chunks, self.kv_heads, self.unit_bytes)
