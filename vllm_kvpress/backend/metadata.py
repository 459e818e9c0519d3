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

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_kvpress.backend.state import method_config_from_vllm_config
from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.eviction.compaction import PromptCompaction
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
    compactions: tuple[PromptCompaction, ...] = field(default=())
    """Eviction methods: requests whose prompt completes in this step, compacted after attention.
    `block_table` and `seq_lens` are then the compacted view (`eviction/view.py`), and these rows'
    own (uncompacted) block ids are in `physical_block_table`."""
    physical_block_table: torch.Tensor | None = None


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
        self.eviction = method_config if method_config.evicts_tokens else None
        if self.eviction is not None:
            self._init_eviction(vllm_config, device)
        logger.info(
            "vllm-kvpress: %s pages with %s; %.1f bytes per token and KV head (%.2fx the bf16 capacity), "
            "block size %d", method_config.method, method_config.to_dict(), layout.bytes_per_token_head,
            layout.compression_vs_bf16, layout.block_size,
        )

    def _init_eviction(self, vllm_config, device) -> None:
        from vllm_kvpress.eviction.prompt_lens import patch_v2_runner_prompt_lens

        if not vllm_config.use_v2_model_runner:
            raise KVCompressionConfigError(
                f"method '{self.eviction.method}' evicts tokens and needs vLLM's V2 model runner, which "
                "vLLM uses for dense (non-MoE) decoder models; allowed: such a model without "
                "VLLM_USE_V2_MODEL_RUNNER=0"
            )
        patch_v2_runner_prompt_lens()
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        # persistent: a captured decode graph reads the view from these addresses at every replay;
        # the table's width is vLLM's, known at the first build (before any capture)
        self.view_block_table: torch.Tensor | None = None
        self.view_seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.view_kept = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.view_shift = torch.zeros(max_seqs, dtype=torch.int32, device=device)

    def _compacted_view(
        self, cm: CommonAttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[PromptCompaction, ...]]:
        """(block table, seq lens) the kernels read, and the compactions this step performs.

        Host work on the rows' prompt lengths (CPU, from the runner patch), then one small copy and
        a gather on the device; no device-to-host sync, so decode steps stay graph-capturable.
        Without prompt lengths (CUDA-graph capture, profiling) nothing is compacted.
        """
        from vllm_kvpress.eviction.view import write_compacted_view

        num_reqs = cm.num_reqs
        block_table = cm.block_table_tensor[:num_reqs]
        width = block_table.shape[1]
        if self.view_block_table is None:
            self.view_block_table = torch.zeros(
                self.view_seq_lens.shape[0], width, dtype=block_table.dtype, device=block_table.device
            )
        if cm.rswa_prefix_lens is None:  # capture or profiling: the view is the table
            self.view_kept[:num_reqs].fill_(width)
            self.view_shift[:num_reqs].zero_()
            compactions: tuple[PromptCompaction, ...] = ()
        else:
            kept, shift, compactions = self._plan_compaction(cm, num_reqs, width)
            self.view_kept[:num_reqs].copy_(torch.from_numpy(kept), non_blocking=True)
            self.view_shift[:num_reqs].copy_(torch.from_numpy(shift), non_blocking=True)
        out_table = self.view_block_table[:num_reqs, :width]
        out_seq = self.view_seq_lens[:num_reqs]
        write_compacted_view(
            block_table, cm.seq_lens[:num_reqs], self.view_kept[:num_reqs], self.view_shift[:num_reqs],
            out_table, out_seq, self.eviction.block_size,
        )
        return out_table, out_seq, compactions

    def _plan_compaction(
        self, cm: CommonAttentionMetadata, num_reqs: int, width: int
    ) -> tuple[np.ndarray, np.ndarray, tuple[PromptCompaction, ...]]:
        """Host side, from the rows' prompt lengths: (kept blocks, shift) of the view per row, and
        the rows whose prompt completes in this step."""
        from vllm_kvpress.eviction.policy import compacts
        from vllm_kvpress.eviction.view import shift_blocks

        bs = self.eviction.block_size
        prompt = np.zeros(num_reqs, dtype=np.int64)
        given = cm.rswa_prefix_lens.cpu().numpy()[:num_reqs]
        prompt[: given.shape[0]] = given  # rows past the given ones are CUDA-graph padding
        starts = cm.query_start_loc_cpu.numpy()[: num_reqs + 1].astype(np.int64)
        seq_cpu = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens_cpu
        seq = seq_cpu.numpy()[:num_reqs].astype(np.int64)
        context = seq - np.diff(starts)
        kept = np.asarray(self.eviction.kept_prompt_blocks(prompt), dtype=np.int64).reshape(num_reqs)
        evicting = (prompt > 0) & np.asarray(compacts(prompt, self.eviction.budget, bs)).reshape(num_reqs)
        compacting_now = evicting & (context < prompt) & (seq >= prompt)
        compactions = tuple(
            PromptCompaction(int(i), int(prompt[i]), int(starts[i]), int(context[i]), int(kept[i]))
            for i in np.nonzero(compacting_now)[0]
        )
        # rows compacted in an earlier step skip their freed blocks; the others see their table
        shift = shift_blocks(prompt, context, self.eviction.budget, bs)
        return np.where(shift > 0, kept, width).astype(np.int32), shift, compactions

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KVPressMetadata:
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            common_attn_metadata, decode_threshold=1
        )
        block_table, seq_lens = common_attn_metadata.block_table_tensor, common_attn_metadata.seq_lens
        compactions: tuple[PromptCompaction, ...] = ()
        if self.eviction is not None:
            block_table, seq_lens, compactions = self._compacted_view(common_attn_metadata)
        return KVPressMetadata(
            num_actual_tokens=common_attn_metadata.num_actual_tokens,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            max_query_len=common_attn_metadata.max_query_len,
            query_start_loc=common_attn_metadata.query_start_loc,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=common_attn_metadata.slot_mapping,
            num_splits=num_decode_splits(num_decodes, self.num_kv_heads, self.num_sms),
            split_buffers=self.split_buffers,
            compactions=compactions,
            physical_block_table=common_attn_metadata.block_table_tensor,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KVPressMetadata:
        metadata = self.build(0, common_attn_metadata)
        # Capture with one token per sequence: the grid does not depend on it, and long dummy
        # sequences would only slow the capture down.
        metadata.seq_lens.fill_(1)
        return metadata
