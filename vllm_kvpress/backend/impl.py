"""Owns KVPressImpl: per layer, write new K/V into compressed pages and attend over them."""

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from vllm_kvpress.backend.flash_prefill import flash_prefill_attention
from vllm_kvpress.backend.metadata import KVPressMetadata
from vllm_kvpress.backend.state import current_method
from vllm_kvpress.decode import decode_attention
from vllm_kvpress.eviction.attention_mass import ChosenRatios
from vllm_kvpress.eviction.compaction import compact_prompt, compact_recent
from vllm_kvpress.eviction.headwise import compact_prompt_headwise
from vllm_kvpress.eviction.mixed import compact_prompt_mixed
from vllm_kvpress.eviction.policy import every_head_blocks
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
from vllm_kvpress.triton_kernels.exact_tail import exact_tail_buffer
from vllm_kvpress.triton_kernels.prefill_attention import prefill_attention
from vllm_kvpress.triton_kernels.recent_queries import recent_query_ring, write_recent_queries

logger = init_logger("vllm.kvpress")
_first_compaction_logged = False


def layer_metadata(layer_name: str) -> KVPressMetadata | None:
    """This step's metadata of the layer, from vLLM's forward context (vLLM passes the cache
    update only the slot mapping); None outside a step with metadata (memory profiling)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # speculative decoding's form: [0] is the base model's
        metadata = metadata[0] if metadata else None
    if isinstance(metadata, dict):
        metadata = metadata.get(layer_name)
    return metadata if isinstance(metadata, KVPressMetadata) else None


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
        method = current_method()
        self.layout = method.page_layout(head_size)
        self.power_iters = method.pages.power_iters
        self.eviction = method.eviction
        # the head policy (razor): the KV heads of every layer that keep every prompt token, chosen
        # once here, in head-wise packed pages
        self.packing = self.eviction.packing(num_kv_heads) if self.eviction is not None else None
        # the precision policy (mikv): the other prompt tokens' low-precision units
        low_layout = self.eviction.low_page_layout(head_size) if self.eviction is not None else None
        self.mixed_units = None if low_layout is None else (
            low_layout, self.eviction.middle_packing(num_kv_heads, head_size).units_per_block)
        self.packed_heads = None
        if self.packing is not None:
            from vllm.config import get_current_vllm_config

            model_config = get_current_vllm_config().model_config.hf_config.to_dict()
            self.packed_heads = self.eviction.packed_heads(model_config, num_kv_heads)
        self._retrieval_ranks: dict[str, tuple[list[int], torch.Tensor]] = {}
        # decode-time eviction: this layer's ring of every request's recent queries, made at the
        # first call (the memory-profiling run), so vLLM counts it before sizing the KV cache
        self.recent_window = self.eviction.decode_observation_window if (
            self.eviction is not None and self.eviction.interval_blocks) else 0
        self.recent_ring: torch.Tensor | None = None
        # tail_keys exact: every request's partial-block keys, made at the first call like the ring
        self.exact_tail: torch.Tensor | None = None
        if self.recent_window or self.layout.exact_tail_keys:  # one entry per request-state slot of the runner
            from vllm.config import get_current_vllm_config

            self.max_requests = get_current_vllm_config().scheduler_config.max_num_seqs

    def _ring(self, query: torch.Tensor) -> torch.Tensor:
        if self.recent_ring is None:
            self.recent_ring = recent_query_ring(self.max_requests, self.recent_window, self.num_heads,
                                                 self.head_size, query.dtype, query.device)
        return self.recent_ring

    def _tail(self, like: torch.Tensor) -> torch.Tensor:
        if self.exact_tail is None:
            self.exact_tail = exact_tail_buffer(self.max_requests, self.num_kv_heads, self.layout, like.dtype,
                                                like.device)
        return self.exact_tail

    def _layer_ranks(self, layer, device) -> tuple[list[int], torch.Tensor]:
        """This layer's retrieval rank of every KV head (-1: not one), as a list and an int32
        device tensor, made at the layer's first call (the memory-profiling run, before capture)."""
        name = getattr(layer, "layer_name", "")
        if name not in self._retrieval_ranks:
            heads = self.packed_heads[extract_layer_index(name)]
            ranks = [heads.index(h) if h in heads else -1 for h in range(self.num_kv_heads)]
            self._retrieval_ranks[name] = ranks, torch.tensor(ranks, dtype=torch.int32, device=device)
        return self._retrieval_ranks[name]

    def _log_first_compaction(self, compaction) -> None:
        """Say once per process that eviction is at work (a serving log shows it took effect)."""
        global _first_compaction_logged
        if not _first_compaction_logged:
            _first_compaction_logged = True
            logger.info("vllm-kvpress: compacted a %d-token prompt into %d blocks of %d tokens (%s pages); the "
                        "blocks after them go back to vLLM's free pool", compaction.prompt_len,
                        compaction.kept_blocks, self.layout.block_size, self.eviction.pages.method)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        m = None if layer is None else layer_metadata(layer.layer_name)
        tail = None
        if self.layout.exact_tail_keys:
            if m is None:  # vLLM's dummy runs (memory profiling, compile warm-up) have no request to keep
                self._tail(key)
                return
            tail = (self._tail(key), m.token_slots)
        write_kv_pages(key, value, kv_cache, slot_mapping, self.layout, power_iters=self.power_iters,
                       completing=None if m is None else m.completing_tokens, tail=tail)

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
        ranks = None if self.packing is None else self._layer_ranks(layer, output.device)
        ring = self._ring(query) if self.recent_window else None
        tail_buffer = self._tail(query) if self.layout.exact_tail_keys else None
        if attn_metadata is None:  # memory-profiling run (ranks, ring and tail above are made before any capture)
            return output.fill_(0)
        m = attn_metadata
        tail = None if tail_buffer is None else (tail_buffer, m.request_slots)
        if ring is not None:  # before the compactions below, which score with this step's queries too
            write_recent_queries(query, ring, m.request_slots, m.query_start_loc, m.physical_seq_lens,
                                 m.seq_lens.shape[0])
        headwise = None if ranks is None else (m.headwise_rows, ranks[1], self.packing.retrieval_heads)
        mixed = None if self.mixed_units is None else (m.headwise_rows, *self.mixed_units)
        if m.num_decodes:
            n = m.num_decode_tokens
            decode_attention(
                query[:n], kv_cache, m.block_table, m.seq_lens, output[:n], self.layout,
                scale=self.scale, num_splits=m.num_splits, split_buffers=m.split_buffers, headwise=headwise,
                tail=tail, mixed=mixed,
            )
        # the builder plans FlashAttention's prefill where vLLM has it; else the Triton prefill kernel
        if m.flash_prefill is not None:
            flash_prefill_attention(
                query, key, value, output, kv_cache, m.block_table, m.seq_lens, self.layout, m.flash_prefill,
                scale=self.scale, first_seq=m.num_decodes, tail=tail, mixed=mixed,
                prefill_context=None if self.eviction is None else self.eviction.prefill_context,
            )
        elif m.num_prefills:
            prefill_attention(
                query, key, value, output, kv_cache, m.block_table, m.query_start_loc, m.seq_lens,
                self.layout, scale=self.scale, first_seq=m.num_decodes, num_seqs=m.num_prefills,
                max_query_len=m.max_query_len, headwise=headwise, tail=tail,
            )
        # after attention: the compaction step itself still attends to every prompt token
        for compaction in m.compactions:
            row = m.physical_block_table[compaction.row]
            if self.mixed_units is not None:
                with ChosenRatios.at_layer(extract_layer_index(layer.layer_name)):  # zipvl's per-layer share
                    compact_prompt_mixed(self.eviction, self.layout, kv_cache, row, query, compaction, self.scale,
                                         power_iters=self.power_iters)
            elif ranks is not None:
                compact_prompt_headwise(
                    self.layout, kv_cache, row, compaction.prompt_len, ranks[0],
                    every_head_blocks(compaction.prompt_len, self.eviction.budget, self.layout.block_size),
                    self.eviction.sink, dtype=query.dtype, power_iters=self.power_iters,
                )
            else:
                compact_prompt(
                    self.eviction, self.layout, kv_cache, row, query, compaction, self.scale,
                    power_iters=self.power_iters,
                )
        if m.compactions:
            self._log_first_compaction(m.compactions[0])
        for compaction in m.recent_compactions:  # over this step's view, which they shorten
            compact_recent(self.eviction, self.layout, kv_cache, m.block_table[compaction.row], ring, compaction,
                           self.scale, power_iters=self.power_iters)
        return output
