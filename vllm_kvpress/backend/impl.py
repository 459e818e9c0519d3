"""Owns KVPressImpl: per layer, write new K/V into compressed pages and attend over them."""

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from vllm_kvpress.backend.flash_prefill import flash_prefill_attention
from vllm_kvpress.backend.metadata import KVPressMetadata
from vllm_kvpress.backend.state import current_method_config
from vllm_kvpress.eviction.compaction import compact_prompt
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
from vllm_kvpress.triton_kernels.decode_attention import decode_attention
from vllm_kvpress.triton_kernels.prefill_attention import prefill_attention


class KVPressImpl(AttentionImpl[KVPressMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window is not None,
            "logits soft cap": bool(logits_soft_cap),
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            "attention sinks": extra.get("sinks") is not None,
        }
        missing = [name for name, used in unsupported.items() if used]
        if missing:
            raise NotImplementedError(
                f"vllm-kvpress attention does not support {', '.join(missing)} (needed by this model)"
            )
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        method_config = current_method_config()
        self.layout = method_config.page_layout(head_size)
        self.power_iters = getattr(method_config, "power_iters", 1)
        self.eviction = method_config if method_config.evicts_tokens else None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        write_kv_pages(key, value, kv_cache, slot_mapping, self.layout, power_iters=self.power_iters)

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVPressMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query/output [num_tokens, num_heads, head_size]; key/value [num_tokens, num_kv_heads, head_size].

        NOTE: with piecewise CUDA graphs this runs eagerly every step for every layer: keep the
        Python here to slicing and two kernel calls, and benchmark any change.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by vllm-kvpress")
        if attn_metadata is None:  # memory-profiling run
            return output.fill_(0)
        m = attn_metadata
        if m.num_decodes:
            n = m.num_decode_tokens
            decode_attention(
                query[:n], kv_cache, m.block_table, m.seq_lens, output[:n], self.layout,
                scale=self.scale, num_splits=m.num_splits, split_buffers=m.split_buffers,
            )
        # the builder plans FlashAttention's prefill where vLLM has it; else the Triton prefill kernel
        if m.flash_prefill is not None:
            flash_prefill_attention(
                query, key, value, output, kv_cache, m.block_table, m.seq_lens, self.layout, m.flash_prefill,
                scale=self.scale, first_seq=m.num_decodes,
            )
        elif m.num_prefills:
            prefill_attention(
                query, key, value, output, kv_cache, m.block_table, m.query_start_loc, m.seq_lens,
                self.layout, scale=self.scale, first_seq=m.num_decodes, num_seqs=m.num_prefills,
                max_query_len=m.max_query_len,
            )
        # after attention: the compaction step itself still attends to every prompt token
        for compaction in m.compactions:
            compact_prompt(
                self.eviction, self.layout, kv_cache, m.physical_block_table[compaction.row], query,
                compaction, self.scale, power_iters=self.power_iters,
            )
        return output
