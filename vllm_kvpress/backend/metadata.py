"""Owns the per-batch attention metadata and its builder (host work once per step, all layers).

    |---------- N-1 iteration --------|
    |---------------- N iteration ---------------------|
    |- tokenA -|......................|-- newTokens ---|
    |---------- context_len ----------|
    |-------------------- seq_len ---------------------|
                                      |-- query_len ---|

The batch arrives reordered with decodes (query_len 1) first. Every tensor the decode kernels
read is either vLLM's persistent runner buffer or a buffer allocated once here, so a decode-only
step can be captured in a CUDA graph (FULL_AND_PIECEWISE).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.logger import init_logger

from vllm_kvpress.backend.state import method_config_from_vllm_config

from vllm_kvpress.triton_kernels.decode_attention import split_buffers

logger = init_logger("vllm.kvpress")

SPLIT_TARGET_WAVES = 4
"""Decode aims for this many programs per SM, cutting sequences into splits when the batch is small."""
MAX_SPLITS = 32


@dataclass
class KVPressMetadata:
    num_actual_tokens: int
    num_decodes: int
    """Sequences with query_len 1, the first rows of the batch."""
    num_decode_tokens: int
    num_prefills: int
    max_query_len: int
    query_start_loc: torch.Tensor
    """(batch_size + 1,) int32, start of each sequence's queries."""
    seq_lens: torch.Tensor
    """(batch_size,) int32, tokens per sequence including this step's."""
    block_table: torch.Tensor
    """(batch_size, max_blocks) int32."""
    slot_mapping: torch.Tensor
    num_splits: int
    split_buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def num_decode_splits(num_decodes: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per sequence so that num_decodes * num_kv_heads * splits fills the GPU a few times.

    Depends only on the batch size, so every replay of a captured graph uses the same grid.
    """
    wanted = -(-SPLIT_TARGET_WAVES * num_sms // max(1, num_decodes * num_kv_heads))
    return max(1, min(MAX_SPLITS, wanted))


class KVPressMetadataBuilder(AttentionMetadataBuilder[KVPressMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        model_config, parallel_config = vllm_config.model_config, vllm_config.parallel_config
        self.num_heads = model_config.get_num_attention_heads(parallel_config)
        self.num_kv_heads = model_config.get_num_kv_heads(parallel_config)
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if torch.device(device).type == "cuda"
            else 1
        )
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        # max over batch sizes B of B * num_decode_splits(B) <= max_seqs + waves*SMs / kv_heads
        capacity = max_seqs + -(-SPLIT_TARGET_WAVES * self.num_sms // self.num_kv_heads)
        self.split_buffers = split_buffers(capacity, self.num_heads, model_config.get_head_size(), device)
        method_config = method_config_from_vllm_config(vllm_config)
        layout = method_config.page_layout(model_config.get_head_size())
        logger.info(
            "vllm-kvpress: %s pages with %s; %.1f bytes per token and KV head (%.2fx the bf16 capacity), "
            "block size %d", method_config.method, method_config.to_dict(), layout.bytes_per_token_head,
            layout.compression_vs_bf16, layout.block_size,
        )

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KVPressMetadata:
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            common_attn_metadata, decode_threshold=1
        )
        return KVPressMetadata(
            num_actual_tokens=common_attn_metadata.num_actual_tokens,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            max_query_len=common_attn_metadata.max_query_len,
            query_start_loc=common_attn_metadata.query_start_loc,
            seq_lens=common_attn_metadata.seq_lens,
            block_table=common_attn_metadata.block_table_tensor,
            slot_mapping=common_attn_metadata.slot_mapping,
            num_splits=num_decode_splits(num_decodes, self.num_kv_heads, self.num_sms),
            split_buffers=self.split_buffers,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KVPressMetadata:
        metadata = self.build(0, common_attn_metadata)
        # Capture with one token per sequence: the grid does not depend on it, and long dummy
        # sequences would only slow the capture down.
        metadata.seq_lens.fill_(1)
        return metadata
