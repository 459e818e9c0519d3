"""mikv through KVPressMetadataBuilder + KVPressImpl over vLLM-shaped steps (CPU interpreter): the
step that completes the prompt splits it into important high-precision blocks and low-precision
units (eviction/mixed.py), the builder hands the decode kernel each row's (K, n, L) and a view
without the freed blocks, and every step's attention equals the reference engine's, whose pages
split the same way (`SequencePages.demote_prompt`)."""

import pytest
import torch
from helpers import impl_for, run_steps_against_reference

from vllm_kvpress.backend.block_manager import EvictionBlockManager
from vllm_kvpress.backend.metadata import KVPressMetadataBuilder
from vllm_kvpress.backend.spec import compressed_spec_for_layer
from vllm_kvpress.config import ALLOW_UNVERIFIED_ENV, load_method_config

HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 64  # the tiny_llama_dir model
BS = 16
SETTINGS = {"method": "mikv", "budget": 48, "block_size": BS, "window": 8, "sink": 4, "observation_window": 8}
PROMPT = 230  # 14 full blocks + a tail of 6; 3 important blocks, 11 chunks of each head in low precision
STEPS = [(0, 128), (128, 230), (230, 231), (231, 232), (232, 240)]


def test_prompt_is_split_once_and_decode_reads_both_precisions(v2_engine_config, monkeypatch, device):
    vllm_config = v2_engine_config(block_size=BS, additional_config={"kv_compression": SETTINGS})
    method = load_method_config(SETTINGS)
    packing = method.middle_packing(KV_HEADS, HEAD_SIZE)
    important, chunks = 3, PROMPT // BS - 3
    low_blocks = packing.middle_blocks(PROMPT // BS, important)
    assert method.kept_prompt_blocks(PROMPT, KV_HEADS, HEAD_SIZE) == important + low_blocks < PROMPT // BS
    impl = impl_for(vllm_config, monkeypatch, HEADS, KV_HEADS, HEAD_SIZE)
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    freed = PROMPT // BS - important - low_blocks

    def check(context, seq_len, metadata):
        assert len(metadata.compactions) == (1 if seq_len == PROMPT else 0)
        split = context >= PROMPT
        assert metadata.headwise_rows.tolist() == [[important, chunks, low_blocks] if split else [0, 0, 0]]
        assert int(metadata.seq_lens[0]) == seq_len - (freed * BS if split else 0)

    # the last step's 8 decodes run as one 8-token chunk would not: keep them single tokens
    steps = STEPS[:-1] + [(t, t + 1) for t in range(232, 240)]
    reference = run_steps_against_reference(impl, builder, method, steps, PROMPT, HEADS, device, check=check)
    assert reference.num_evicted == freed * BS


def test_the_block_manager_frees_what_the_worker_leaves(v2_engine_config, monkeypatch):
    """The scheduler's spec carries the method's low-precision packing, so the manager frees
    exactly the blocks after the important and low ones."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    vllm_config = v2_engine_config(block_size=BS, additional_config={"kv_compression": SETTINGS})
    spec = compressed_spec_for_layer(
        FullAttentionSpec(block_size=BS, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16),
        vllm_config,
    )
    method = load_method_config(SETTINGS)
    assert spec.packing == method.middle_packing(KV_HEADS, HEAD_SIZE)
    manager = object.__new__(EvictionBlockManager)  # only the schedule is exercised
    manager.kv_cache_spec, manager.block_size = spec, BS
    removed = []
    manager._remove_blocks_in_range = lambda request_id, start, end: removed.append((start, end))
    manager.remove_skipped_blocks("r", PROMPT - 1, PROMPT)
    assert removed == []
    manager.remove_skipped_blocks("r", PROMPT, PROMPT)
    assert removed == [(method.kept_prompt_blocks(PROMPT, KV_HEADS, HEAD_SIZE), PROMPT // BS)]


def test_vllm_refuses_a_method_held_to_the_reference_engine(v2_engine_config, monkeypatch, held_back_mikv):
    """A `Status.REFERENCE_ONLY` method: an engine config for it fails with the reason and where it
    runs instead; the developers' override lets it through, with a warning."""
    from vllm_kvpress.errors import MethodNotImplementedError

    with pytest.raises(MethodNotImplementedError, match="'mikv' is not enabled in vLLM yet.*--engine reference"):
        v2_engine_config(block_size=BS, additional_config={"kv_compression": SETTINGS})
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    vllm_config = v2_engine_config(block_size=BS, additional_config={"kv_compression": SETTINGS})
    assert vllm_config.additional_config["kv_compression"]["method"] == "mikv"
