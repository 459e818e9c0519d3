"""Owns the byte layout of a compressed KV page: the only place page and region sizes are computed.

A page is what vLLM calls a block: `block_size` consecutive tokens of one request, for every KV
head of one layer. vLLM sees it as `num_kv_heads * bytes_per_head` raw bytes; we lay out each
head's share as consecutive regions, each padded to `ALIGN_BYTES`:

    k_codes   [block_size, head_size * k_bits / 8]  packed K codes, token-major (packed along channels)
    v_codes   [head_size, block_size * v_bits / 8]  packed V codes, channel-major (packed along tokens)
    k_meta    K scales/zeros, in one of two forms (same bytes, chosen by block state):
                complete block: fp16 scale[head_size], fp16 zero[head_size]   (per channel, KIVI)
                partial block:  fp16 scale[block_size, k_stage_groups]        (per token and channel
                                group, symmetric: the zero is -scale * (2^bits - 1) / 2)
    v_meta    fp16 scale[block_size, groups], fp16 zero[block_size, groups]   (per token and group)
    k_lowrank fp16 a[rank, block_size], fp16 b[rank, head_size]   (GEAR residual K ~ a^T b)
    v_lowrank same for V
    k_sparse  int16 index[num_outliers] (token * head_size + channel), fp16 value[num_outliers]
    v_sparse  same for V

Codes are packed little-end first along the packed dimension: K channel `c` of a token sits in byte
`c * bits // 8` of the token's row at bit `(c * bits) % 8`; V token `t` of a channel in byte
`t * bits // 8` of the channel's row. Each tensor is packed along the dimension its attention matmul
reduces over (K: channels, V: tokens), which lets the decode kernel feed the packed tiles to the
tensor cores without a shared-memory transpose. A block is *complete* once all `block_size` tokens
are written; until then its K codes are per-token ("staging"), because per-channel K statistics need
the whole block. With `exact_tail_keys` a partial block's K is not in the page at all: it is kept
exact in the model dtype outside the pages (`triton_kernels/exact_tail.py`, KIVI's full-precision
residual) and its K codes and meta are unwritten until the block completes (docs/quantized_pages.md
says why).
"""

from dataclasses import dataclass
from functools import cached_property

SUPPORTED_HEAD_SIZES = (64, 128)
"""Head sizes the kernels are built and tested for (power-of-two tiles)."""
ALIGN_BYTES = 16
"""Every region starts on a 16-byte boundary so kernels can issue 16-byte vector loads."""
FP16_BYTES = 2
INDEX_BYTES = 2
"""Sparse outlier positions are int16 `token * head_size + channel`, so block_size * head_size <= 32768."""
BF16_BYTES = 2


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(frozen=True)
class PageLayout:
    head_size: int
    block_size: int
    """Tokens per page; also the token group of per-channel K quantization."""
    k_bits: int
    v_bits: int
    v_group_size: int
    """Channels per V quantization group (divides head_size)."""
    rank: int = 0
    """Rank of the per-block low-rank residual (GEAR); 0 disables it."""
    num_outliers: int = 0
    """Sparse outlier slots per block, head and tensor (GEAR); 0 disables them."""
    exact_tail_keys: bool = False
    """Partial blocks keep K exact outside the page (`tail_keys: exact`) instead of staged in it."""

    def __post_init__(self) -> None:
        # Callers validate user input (config.py); these guard internal misuse.
        if self.head_size % self.v_group_size:
            raise ValueError(f"v_group_size {self.v_group_size} must divide head_size {self.head_size}")
        for bits in (self.k_bits, self.v_bits):
            if (self.head_size * bits) % 8:
                raise ValueError(f"head_size {self.head_size} x {bits} bits is not a whole number of bytes")
        if self.block_size * self.head_size > 2**15:
            raise ValueError("block_size * head_size must fit an int16 outlier index (<= 32768)")

    # -- region sizes in bytes, per (block, kv head) --------------------------------------------
    @property
    def k_codes_bytes(self) -> int:
        return self.block_size * self.head_size * self.k_bits // 8

    @property
    def v_codes_bytes(self) -> int:
        return self.block_size * self.head_size * self.v_bits // 8

    @property
    def k_stage_groups(self) -> int:
        """Channel groups per token of a partial block's K: as many fp16 scales as fit in the bytes
        the complete block's per-channel scale+zero use (one group = block_size / 2 channels)."""
        return max(1, 2 * self.head_size // self.block_size)

    @property
    def k_stage_group_size(self) -> int:
        return self.head_size // self.k_stage_groups

    @property
    def k_meta_bytes(self) -> int:
        per_channel = 2 * self.head_size * FP16_BYTES
        per_token_staging = self.block_size * self.k_stage_groups * FP16_BYTES
        return max(per_channel, per_token_staging)

    @property
    def v_groups(self) -> int:
        return self.head_size // self.v_group_size

    @property
    def v_meta_bytes(self) -> int:
        return 2 * self.block_size * self.v_groups * FP16_BYTES

    @property
    def lowrank_bytes(self) -> int:
        return self.rank * (self.block_size + self.head_size) * FP16_BYTES

    @property
    def sparse_bytes(self) -> int:
        return self.num_outliers * (INDEX_BYTES + FP16_BYTES)

    @cached_property
    def _offsets(self) -> dict[str, int]:
        sizes = {
            "k_codes": self.k_codes_bytes,
            "v_codes": self.v_codes_bytes,
            "k_meta": self.k_meta_bytes,
            "v_meta": self.v_meta_bytes,
            "k_lowrank": self.lowrank_bytes,
            "v_lowrank": self.lowrank_bytes,
            "k_sparse": self.sparse_bytes,
            "v_sparse": self.sparse_bytes,
        }
        offsets, cursor = {}, 0
        for name, size in sizes.items():
            offsets[name] = cursor
            cursor += _align(size)
        offsets["end"] = cursor
        return offsets

    def offset(self, region: str) -> int:
        """Byte offset of `region` (a name from the module docstring) inside a head's page."""
        return self._offsets[region]

    # -- totals ---------------------------------------------------------------------------------
    @property
    def bytes_per_head(self) -> int:
        """Bytes one KV head of one block occupies."""
        return self._offsets["end"]

    def page_size_bytes(self, num_kv_heads: int) -> int:
        """Bytes of one vLLM block of one layer: what the KV-cache spec reports."""
        return self.bytes_per_head * num_kv_heads

    @property
    def bytes_per_token_head(self) -> float:
        return self.bytes_per_head / self.block_size

    @property
    def compression_vs_bf16(self) -> float:
        """bf16 bytes of K+V per token and head divided by ours: the capacity multiplier."""
        return 2 * self.head_size * BF16_BYTES / self.bytes_per_token_head

    @cached_property
    def kernel_constants(self) -> dict[str, int]:
        """The layout as Triton constexpr keyword arguments (UPPER_CASE), for every kernel.

        Cached: kernels are launched per layer and step; callers only unpack it, never mutate it."""
        return {
            "BLOCK_SIZE": self.block_size,
            "HEAD_SIZE": self.head_size,
            "K_BITS": self.k_bits,
            "V_BITS": self.v_bits,
            "V_GROUP": self.v_group_size,
            "K_STAGE_GROUP": self.k_stage_group_size,
            "RANK": self.rank,
            "NUM_OUTLIERS": self.num_outliers,
            "EXACT_TAIL": int(self.exact_tail_keys),
            "K_CODES_OFF": self.offset("k_codes"),
            "V_CODES_OFF": self.offset("v_codes"),
            "K_META_OFF": self.offset("k_meta"),
            "V_META_OFF": self.offset("v_meta"),
            "K_LOWRANK_OFF": self.offset("k_lowrank"),
            "V_LOWRANK_OFF": self.offset("v_lowrank"),
            "K_SPARSE_OFF": self.offset("k_sparse"),
            "V_SPARSE_OFF": self.offset("v_sparse"),
        }
