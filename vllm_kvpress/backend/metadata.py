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

from vllm_kvpress import cuda_decode
from vllm_kvpress.backend.flash_prefill import FlashPrefillPlan, flash_attention_version, plan_flash_prefill
from vllm_kvpress.backend.host_copy import copy_to_device
from vllm_kvpress.backend.runner import runner_problems
from vllm_kvpress.backend.state import method_from_vllm_config
from vllm_kvpress.decode import decode_kernel
from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.eviction import prompt_lens
from vllm_kvpress.eviction.compaction import PromptCompaction, RecentCompaction
from vllm_kvpress.triton_kernels.cache_write import completing_tokens, max_completions
from vllm_kvpress.triton_kernels.decode_attention import MAX_SPLITS, split_buffers

logger = init_logger("vllm.kvpress")

SPLIT_TARGET_WAVES = 4
"""Decode aims for this many programs per SM, cutting sequences into splits when the batch is small."""


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
    flash_prefill: FlashPrefillPlan | None = None
    """The prefill sequences' varlen layout for FlashAttention, where the impl uses it."""
    headwise_rows: torch.Tensor | None = None
    """Packed rows: int32 [batch_size, 3] (kept K, chunks n, middle M) per row, all 0 for a row
    whose pages are not packed; head-wise (razor, eviction/headwise.py) or mixed-precision (MiKV,
    M blocks of low-precision units, vllm_kvpress/mixed_layout.py); None for the other methods."""
    completing_tokens: torch.Tensor | None = None
    """int32: the rows of `slot_mapping` that complete a block, then -1 (`completing_tokens`); one
    list for every layer's cache write, in a persistent buffer."""
    recent_compactions: tuple[RecentCompaction, ...] = field(default=())
    """Decode-time eviction: rows that reach an eviction point in this step, compacted after
    attention over this step's view (`block_table`, `seq_lens`)."""
    request_slots: torch.Tensor | None = None
    """Decode-time eviction: int32 [batch_size] each row's request-state slot (padding rows: the
    ring's spare slot), under which every layer keeps the row's recent queries; None without."""
    physical_seq_lens: torch.Tensor | None = None
    """vLLM's own seq lens (tokens per request, not per view): the recent queries' positions."""
    token_slots: torch.Tensor | None = None
    """Exact tail (`tail_keys: exact`): int32 [>= num_tokens] each input token's request-state slot,
    under which the cache write keeps a partial block's keys; `request_slots` is the same per row,
    for the readers. None without an exact tail."""


def num_decode_splits(num_decodes: int, num_kv_heads: int, num_sms: int) -> int:
    """Splits per sequence so that num_decodes * num_kv_heads * splits fills the GPU a few times.

    Depends only on the batch size, so every replay of a captured graph uses the same grid.
    """
    wanted = -(-SPLIT_TARGET_WAVES * num_sms // max(1, num_decodes * num_kv_heads))
    return max(1, min(MAX_SPLITS, wanted))


def host_seq_lens(cm: CommonAttentionMetadata) -> np.ndarray:
    """int64 [num_reqs] seq lens on the host. The runner's upper bound is exact for prefill rows
    and, without speculative decoding (which the plugin refuses), for every row; reading the device
    copy instead would sync."""
    seq_cpu = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens_cpu
    return seq_cpu.numpy()[: cm.num_reqs].astype(np.int64)


def host_prompt_lens(cm: CommonAttentionMetadata, num_reqs: int) -> np.ndarray:
    """int64 [num_reqs] prompt tokens per row on the host (the runner patch's, eviction/prompt_lens.py);
    0 for rows past the given ones (CUDA-graph padding)."""
    prompt = np.zeros(num_reqs, dtype=np.int64)
    given = cm.rswa_prefix_lens.cpu().numpy()[:num_reqs]
    prompt[: given.shape[0]] = given
    return prompt


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
        method = method_from_vllm_config(vllm_config)
        head_size = model_config.get_head_size()
        # mixed-precision pages (MiKV): the low-precision units' layout, read by a second decode pass
        self.low_layout = method.eviction.low_page_layout(head_size) if method.eviction is not None else None
        # max over batch sizes B of B * num_decode_splits(B) <= max_seqs + waves*SMs / kv_heads,
        # twice that where mixed-precision rows are read in two passes
        capacity = max_seqs + -(-SPLIT_TARGET_WAVES * self.num_sms // self.num_kv_heads)
        capacity *= 2 if self.low_layout is not None else 1
        self.split_buffers = split_buffers(capacity, self.num_heads, head_size, device)
        problems = runner_problems(vllm_config, method)
        if problems:  # a config vLLM's engine creation did not check (ours checks it there too)
            raise KVCompressionConfigError(problems)
        layout = method.page_layout(model_config.get_head_size())
        self.block_size = layout.block_size
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        self.completing_buffer = torch.empty(
            max_completions(max_tokens, max_seqs, self.block_size) + 1, dtype=torch.int32, device=device
        )
        # prefill through vLLM's FlashAttention where it has one for this GPU, else the Triton kernel
        self.fa_version = flash_attention_version() if torch.device(device).type == "cuda" else None
        self.eviction = method.eviction
        self.packing = None
        # each row's request-state slot: decode-time eviction's query ring, the exact tail
        self.spare_slot = max_seqs
        self.request_slots: torch.Tensor | None = None
        self.token_slots: torch.Tensor | None = None
        if self.eviction is not None:
            self._init_eviction(vllm_config, device)
        self.exact_tail = layout.exact_tail_keys
        if self.exact_tail:
            self._init_exact_tail(vllm_config, device)
        # decode through the CUDA kernel where it takes these pages; built now, before graph capture
        group = self.num_heads // self.num_kv_heads
        decode, decode_why = decode_kernel(layout, group, model_config.dtype, torch.device(device))
        if self.low_layout is not None:
            decode, decode_why = "triton", "the CUDA kernel does not read mixed-precision pages"
        elif self.packing is not None:
            decode, decode_why = "triton", ("the CUDA kernel's head-wise path has passed its kernel test on a GPU "
                                            "but not yet run in an engine")
        if decode == "cuda":
            cuda_decode.build(layout, group, model_config.dtype, torch.device(device))
        logger.info(
            "vllm-kvpress: %s pages with %s; %.1f bytes per token and KV head (%.2fx the bf16 capacity), "
            "block size %d; prefill attention: %s; decode attention: %s kernel (%s)", method.method,
            method.to_dict(), layout.bytes_per_token_head, layout.compression_vs_bf16, layout.block_size,
            "Triton kernel" if self.fa_version is None
            else f"FlashAttention {self.fa_version} over the dequantized context",
            decode, decode_why,
        )

    def _init_eviction(self, vllm_config, device) -> None:
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        # persistent: a captured decode graph reads the view from these addresses at every replay;
        # the table's width is vLLM's, known at the first build (before any capture)
        self.view_block_table: torch.Tensor | None = None
        self.view_seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.view_kept = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.view_shift = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        # the schedule's packing: razor's retrieval chunks or MiKV's low-precision units
        self.packing = self.eviction.middle_packing(self.num_kv_heads, vllm_config.model_config.get_head_size())
        self.interval_blocks = self.eviction.interval_blocks
        # decode-time eviction: each row's request-state slot, the ring's spare slot for padding
        self.request_slots = (
            torch.full((max_seqs,), self.spare_slot, dtype=torch.int32, device=device) if self.interval_blocks else None
        )
        self.view_headwise = (
            torch.zeros(max_seqs, 3, dtype=torch.int32, device=device) if self.packing is not None else None
        )

    def _init_exact_tail(self, vllm_config, device) -> None:
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        # persistent: captured decode graphs read the slots from these addresses at every replay
        self.request_slots = torch.full((max_seqs,), self.spare_slot, dtype=torch.int32, device=device)
        self.token_slots = torch.full((max_tokens,), self.spare_slot, dtype=torch.int32, device=device)

    def _write_tail_slots(self, cm: CommonAttentionMetadata) -> None:
        """Each row's and each input token's request-state slot into the persistent buffers (the
        spare slot where the step has none: CUDA-graph capture and profiling)."""
        num_reqs = cm.num_reqs
        if cm.rswa_prefix_lens is None:
            self.request_slots[:num_reqs].fill_(self.spare_slot)
            self.token_slots.fill_(self.spare_slot)
            return
        slots = self._request_slots(cm, num_reqs)
        query_lens = np.diff(cm.query_start_loc_cpu.numpy()[: num_reqs + 1])
        per_token = np.repeat(slots, query_lens)
        copy_to_device(slots, self.request_slots[:num_reqs])
        copy_to_device(per_token, self.token_slots[: per_token.shape[0]])

    def _compacted_view(
        self, cm: CommonAttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[PromptCompaction, ...], tuple[RecentCompaction, ...],
               np.ndarray | None, torch.Tensor | None, np.ndarray | None]:
        """(block table, seq lens) the kernels read, the prompt and decode-time compactions this
        step performs, the view's seq lens on the host (None where the view is the table) and,
        with head-wise packing, the rows' (K, n, M) on the device and on the host (None where
        nothing is packed).

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
        headwise = None if self.view_headwise is None else self.view_headwise[:num_reqs]
        headwise_cpu = None
        if cm.rswa_prefix_lens is None:  # capture or profiling: no shift, the view is the table
            self.view_shift[:num_reqs].zero_()
            if headwise is not None:
                headwise.zero_()
            if self.request_slots is not None:
                self.request_slots[:num_reqs].fill_(self.spare_slot)
            compactions: tuple[PromptCompaction, ...] = ()
            recent: tuple[RecentCompaction, ...] = ()
            view_seq_cpu = None  # the table's own lengths; read from the host only where needed
        else:
            kept, shift, compactions, recent, view_seq_cpu, headwise_cpu = self._plan_compaction(cm, num_reqs)
            copy_to_device(kept, self.view_kept[:num_reqs])
            copy_to_device(shift, self.view_shift[:num_reqs])
            if headwise is not None:
                copy_to_device(headwise_cpu, headwise)
        out_table = self.view_block_table[:num_reqs, :width]
        out_seq = self.view_seq_lens[:num_reqs]
        write_compacted_view(
            block_table, cm.seq_lens[:num_reqs], self.view_kept[:num_reqs], self.view_shift[:num_reqs],
            out_table, out_seq, self.eviction.block_size,
        )
        return out_table, out_seq, compactions, recent, view_seq_cpu, headwise, headwise_cpu

    def _request_slots(self, cm: CommonAttentionMetadata, num_reqs: int) -> np.ndarray:
        """Host: each row's request-state slot (the runner patch's), the spare slot for padding."""
        given = prompt_lens.request_slots_for(cm.rswa_prefix_lens)
        if given is None:
            raise RuntimeError(
                "decode-time eviction (decode_interval) and tail_keys='exact' need the request-state slots of "
                "vLLM's V2 model runner, which this step's metadata did not come with"
            )
        slots = np.full(num_reqs, self.spare_slot, dtype=np.int32)
        slots[: given.shape[0]] = given[:num_reqs]
        return slots

    def _plan_compaction(
        self, cm: CommonAttentionMetadata, num_reqs: int
    ) -> tuple[np.ndarray, np.ndarray, tuple[PromptCompaction, ...], tuple[RecentCompaction, ...], np.ndarray,
               np.ndarray | None]:
        """Host side, from the rows' prompt lengths: (kept blocks, shift) of the view per row (a row
        with shift 0 is copied whatever its kept count), the rows whose prompt completes in this
        step and those that reach a decode-time eviction point, the view's seq lens (what
        `write_compacted_view` writes on the device) and, with head-wise packing, each row's
        (K, n, M), zeros for a row that is not packed yet."""
        from vllm_kvpress.eviction.policy import every_head_blocks, freed_end, kept_blocks
        from vllm_kvpress.eviction.view import shift_blocks

        bs = self.eviction.block_size
        prompt = host_prompt_lens(cm, num_reqs)
        starts = cm.query_start_loc_cpu.numpy()[: num_reqs + 1].astype(np.int64)
        seq = host_seq_lens(cm)
        context = seq - np.diff(starts)
        schedule = (self.eviction.budget, bs, self.packing, self.interval_blocks)
        kept = kept_blocks(prompt, *schedule)
        # blocks [kept, end) are freed after a step: rows whose end grows in this step compact; the
        # others (padding rows, P = 0, included) do not
        shift = shift_blocks(prompt, context, *schedule)  # compactions of earlier steps: the view skips them
        end_before, end_after = kept + shift, freed_end(prompt, seq, *schedule)
        compacting = end_after > end_before
        first_tail = prompt // bs
        compactions = tuple(
            PromptCompaction(int(i), int(prompt[i]), int(starts[i]), int(context[i]), int(kept[i]))
            for i in np.nonzero(compacting & (end_after == first_tail))[0]
        )
        recent: tuple[RecentCompaction, ...] = ()
        if self.request_slots is not None:
            slots = self._request_slots(cm, num_reqs)
            copy_to_device(slots, self.request_slots[:num_reqs])
            view_seq = seq - shift.astype(np.int64) * bs
            # the candidates: the view's blocks before the new end (kept ones and those since)
            recent = tuple(
                RecentCompaction(int(i), int(slots[i]), int(seq[i]), int(view_seq[i]),
                                 int(end_after[i] - shift[i]) * bs, int(kept[i]))
                for i in np.nonzero(compacting & (end_after > first_tail))[0]
            )
        headwise = None
        if self.packing is not None:  # packed rows' (K, n, M): K blocks every head keeps, K + M in all
            every_head = every_head_blocks(prompt, self.eviction.budget, bs)
            rows = np.stack([every_head, prompt // bs - every_head, kept - every_head], 1)
            headwise = np.where((shift > 0)[:, None], rows, 0).astype(np.int32)
        return kept.astype(np.int32), shift, compactions, recent, seq - shift.astype(np.int64) * bs, headwise

    def _sparse_prefill_seqs(self, cm: CommonAttentionMetadata, num_decodes: int, num_prefills: int) -> tuple[int, ...]:
        """The prefill rows (0-based after the decodes) whose chunk lies in a prompt the method
        prefills sparsely (`sparse_prefill`, zipvl); the plan keeps those with context."""
        if self.eviction is None or cm.rswa_prefix_lens is None:  # capture or profiling: dense
            return ()
        rows = slice(num_decodes, num_decodes + num_prefills)
        prompt, seq = host_prompt_lens(cm, cm.num_reqs)[rows], host_seq_lens(cm)[rows]
        return tuple(i for i in range(num_prefills)
                     if seq[i] <= prompt[i] and self.eviction.sparse_prefill(int(prompt[i])))

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> KVPressMetadata:
        cm = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(cm, decode_threshold=1)
        block_table, seq_lens = cm.block_table_tensor, cm.seq_lens
        compactions: tuple[PromptCompaction, ...] = ()
        recent: tuple[RecentCompaction, ...] = ()
        seq_cpu = headwise = headwise_cpu = None
        if self.eviction is not None:  # the kernels see the compacted view, and so does the FA plan
            block_table, seq_lens, compactions, recent, seq_cpu, headwise, headwise_cpu = self._compacted_view(cm)
        if self.exact_tail:
            self._write_tail_slots(cm)
        # prefill rows (after the decodes) over packed pages (a re-prefill of a preempted request past
        # its compacted prompt). Head-wise: each KV head has its own context length, which
        # FlashAttention's varlen layout cannot express; mixed precision: every head holds n chunks
        # where the view has M blocks, so the plan counts the tokens the rows hold
        packed_prefill = headwise_cpu is not None and bool((headwise_cpu[num_decodes:, 2] > 0).any())
        if packed_prefill and self.low_layout is not None:
            if self.fa_version is None:
                raise NotImplementedError(
                    "a prefill chunk over mixed-precision pages (a preempted request re-prefilled past its "
                    "prompt) is read for vLLM's FlashAttention only, which this device does not have"
                )
            seq_cpu = (host_seq_lens(cm) if seq_cpu is None else seq_cpu) + (
                headwise_cpu[:, 1].astype(np.int64) - headwise_cpu[:, 2]) * self.block_size
            packed_prefill = False
        num_tokens = cm.slot_mapping.shape[0]
        completing = completing_tokens(
            cm.slot_mapping, self.block_size, max_completions(num_tokens, cm.num_reqs, self.block_size),
            out=self.completing_buffer,
        )
        flash_prefill = None
        # such a chunk (a re-prefill of a preempted request past its compacted prompt) runs through
        # the Triton prefill kernel, which reads per head
        sparse_seqs = self._sparse_prefill_seqs(cm, num_decodes, num_prefills) if num_prefills else ()
        if sparse_seqs and (self.fa_version is None or packed_prefill):
            raise NotImplementedError(
                f"method '{self.eviction.method}' prefills long prompts sparsely, which is built for vLLM's "
                "FlashAttention prefill only; this device or step runs the Triton prefill kernel"
            )
        if num_prefills and self.fa_version is not None and not packed_prefill:
            seq_cpu = host_seq_lens(cm) if seq_cpu is None else seq_cpu
            flash_prefill = plan_flash_prefill(
                cm.query_start_loc_cpu.numpy(), seq_cpu, num_decodes, num_prefills, self.block_size,
                seq_lens.device, self.fa_version, sparse_seqs,
            )
        return KVPressMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens,
            num_prefills=num_prefills,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=cm.slot_mapping,
            num_splits=num_decode_splits(num_decodes, self.num_kv_heads, self.num_sms),
            split_buffers=self.split_buffers,
            compactions=compactions,
            physical_block_table=cm.block_table_tensor,
            flash_prefill=flash_prefill,
            completing_tokens=completing,
            headwise_rows=headwise,
            recent_compactions=recent,
            request_slots=None if self.request_slots is None else self.request_slots[: cm.num_reqs],
            physical_seq_lens=cm.seq_lens,
            token_slots=self.token_slots,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> KVPressMetadata:
        metadata = self.build(0, common_attn_metadata)
        # Capture with one token per sequence: the grid does not depend on it, and long dummy
        # sequences would only slow the capture down.
        metadata.seq_lens.fill_(1)
        return metadata
