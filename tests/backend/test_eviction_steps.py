"""An evicting method through KVPressMetadataBuilder + KVPressImpl over vLLM-shaped steps (CPU
interpreter): the step that completes the prompt compacts it, later steps attend over kept + tail +
new tokens through the compacted view, exactly as the reference engine does."""

import pytest
import torch
from helpers import impl_for, run_steps_against_reference, single_request_step_metadata, use_v2_runner, v2_runner_config

from vllm_kvpress.backend import impl as impl_module
from vllm_kvpress.backend.metadata import KVPressMetadataBuilder
from vllm_kvpress.config import load_method_config
from vllm_kvpress.errors import KVCompressionConfigError

HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 64  # the tiny_llama_dir model
SETTINGS = {"method": "snapkv", "budget": 48, "block_size": 16, "window": 8, "sink": 4, "observation_window": 8}
PROMPT = 150  # 9 full blocks of 16 + a tail of 6; the budget keeps 3 blocks
STEPS = [(0, 128), (128, 150), (150, 151), (151, 152)]  # (context, seq_len): two prefill chunks, two decodes


def _metadata(builder, block_table, context, seq_len, slot_mapping, device):
    return single_request_step_metadata(builder, block_table, context, seq_len, slot_mapping, PROMPT, device)


@pytest.mark.parametrize("budget", [48, 0.3])  # 0.3 x 150 = 45 tokens -> 3 blocks as well
def test_prompt_is_compacted_once_and_decode_reads_the_view(budget, v2_engine_config, monkeypatch, device):
    settings = {**SETTINGS, "budget": budget}
    vllm_config = v2_engine_config(block_size=16, additional_config={"kv_compression": settings})
    config = load_method_config(settings)
    monkeypatch.setattr(impl_module, "current_method", lambda: config)
    impl = impl_module.KVPressImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None, "auto")
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    bs = 16
    block_ids = []

    def check(context, seq_len, metadata):
        assert len(metadata.compactions) == (1 if seq_len == PROMPT else 0)
        shifted = 9 - 3 if context >= PROMPT else 0
        assert int(metadata.seq_lens[0]) == seq_len - shifted * bs
        block_ids.append((int(metadata.block_table[0, 3]), int(metadata.physical_block_table[0, 3 + shifted])))

    reference = run_steps_against_reference(impl, builder, config, STEPS, PROMPT, HEADS, device, check=check)
    assert all(view == physical for view, physical in block_ids)
    assert reference.num_tokens == 3 * bs + 6 + 2


def test_eviction_refuses_vllms_v1_runner(engine_config, monkeypatch):
    """vLLM picks its V1 runner on a CPU platform, as it does for MoE models or with
    VLLM_USE_V2_MODEL_RUNNER=0; it never hands the builder prompt lengths. Refused when the engine
    config is made, before a model loads, and by the builder of a config made elsewhere."""
    with pytest.raises(KVCompressionConfigError, match="evicts tokens and needs vLLM's V2 model runner"):
        engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    use_v2_runner(monkeypatch)
    vllm_config = engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    monkeypatch.setattr(type(vllm_config), "use_v2_model_runner", property(lambda self: False))
    with pytest.raises(KVCompressionConfigError, match="evicts tokens and needs vLLM's V2 model runner"):
        KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device("cpu"))


def test_flashattention_prefill_plans_over_the_compacted_view(v2_engine_config, monkeypatch, device):
    """The varlen plan a GPU with FlashAttention gets counts the tokens the kernels see: the whole
    table while the prompt is prefilled, the compacted view for a chunk after the compaction."""
    vllm_config = v2_engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    builder.fa_version = 3  # what a Hopper GPU gets
    block_table = torch.randperm(16, dtype=torch.int32, device=device)[None]
    # two prompt chunks, then a chunk past the compacted prompt (a re-prefill after preemption)
    for context, seq_len, seen in [(0, 128, 128), (128, 150, 150), (150, 160, 160 - (9 - 3) * 16)]:
        slots = torch.zeros(seq_len - context, dtype=torch.int64, device=device)
        metadata = _metadata(builder, block_table, context, seq_len, slots, device)
        plan = metadata.flash_prefill
        assert int(metadata.seq_lens[0]) == seen and plan.cu_seqlens_k.tolist() == [0, seen]
        assert plan.context_lens.tolist() == [seen - (seq_len - context)]
        assert plan.has_context == (context > 0)


DECODE_SETTINGS = {**SETTINGS, "method": "scissorhands", "decode_interval": 16, "decode_observation_window": 4}
DECODE_END = 178  # decode-time rounds at (9 + m) * 16 tokens: 160 and 176


def test_decode_time_eviction_compacts_each_round_as_the_reference_engine(engine_config, monkeypatch, device):
    """Prompt compaction, then two decode-time rounds (every 16 tokens after the prompt's 9 full
    blocks), each scored by the last 4 queries: the kernels read the view of kept + recent tokens
    and every step's attention equals the reference engine's over its own compacted pages."""
    from vllm_kvpress.eviction import prompt_lens
    from vllm_kvpress.eviction.policy import freed_end

    monkeypatch.setattr(prompt_lens, "_step_slots", None)
    vllm_config = v2_runner_config(engine_config, monkeypatch, DECODE_SETTINGS, 16)
    impl = impl_for(vllm_config, monkeypatch, HEADS, KV_HEADS, HEAD_SIZE)
    config = load_method_config(DECODE_SETTINGS)
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    bs = 16
    steps = [(0, 128), (128, PROMPT)] + [(n, n + 1) for n in range(PROMPT, DECODE_END)]
    rounds = []

    def check(context, seq_len, metadata):
        if metadata.recent_compactions:
            rounds.append(seq_len)
            (compaction,) = metadata.recent_compactions
            assert (compaction.request_slot, compaction.kept_blocks) == (2, 3)
            assert compaction.num_candidates == compaction.view_len == (3 + 1) * bs  # kept + the block since
        shifted = freed_end(PROMPT, context, 48, bs, None, 1) - 3
        assert int(metadata.seq_lens[0]) == seq_len - shifted * bs
        assert int(metadata.request_slots[0]) == 2

    reference = run_steps_against_reference(impl, builder, config, steps, PROMPT, HEADS, device, request_slot=2,
                                            check=check)
    assert rounds == [160, 176]
    # the request holds its 3 kept blocks and the 2 tokens since the last round
    assert reference.num_tokens == 3 * bs + 2 and reference.num_evicted == DECODE_END - (3 * bs + 2)


def _decode_batch_metadata(builder, rows, num_padding, slots, device):
    """A uniform decode step over `rows` [(context, prompt)], plus `num_padding` CUDA-graph padding
    rows (no tokens, no prompt length), as vLLM's V2 runner hands it to the builder."""
    import numpy as np
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_kvpress.eviction import prompt_lens

    num_reqs = len(rows) + num_padding
    qsl = torch.tensor(list(range(len(rows) + 1)) + [len(rows)] * num_padding, dtype=torch.int32)
    seq = torch.tensor([c + 1 for c, _ in rows] + [0] * num_padding, dtype=torch.int32)
    table = torch.arange(num_reqs * 20, dtype=torch.int32, device=device).reshape(num_reqs, 20)
    common = CommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq.to(device), _seq_lens_cpu=seq,
        num_reqs=num_reqs, num_actual_tokens=len(rows), max_query_len=1, max_seq_len=int(seq.max()),
        block_table_tensor=table, slot_mapping=torch.zeros(num_reqs, dtype=torch.int64, device=device),
        rswa_prefix_lens=torch.tensor([p for _, p in rows], dtype=torch.int32),
    )
    if slots is not None:
        prompt_lens._step_slots = (common.rswa_prefix_lens, np.array(slots, dtype=np.int32))
    return builder.build(0, common)


def test_a_decode_batch_compacts_only_the_rows_at_an_eviction_point(v2_engine_config, monkeypatch, device):
    """Rows of one decode step: one reaching its first round (176 tokens), one its second (208),
    one between rounds, one whose prompt fits the budget; padding rows read the ring's spare slot."""
    from vllm_kvpress.eviction import prompt_lens

    monkeypatch.setattr(prompt_lens, "_step_slots", None)
    vllm_config = v2_engine_config(block_size=16, additional_config={"kv_compression": {**DECODE_SETTINGS,
                                                                                          "decode_interval": 32}})
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    rows = [(175, 150), (207, 150), (180, 150), (40, 40)]  # (context, prompt); rounds at (9 + 2 m) * 16
    metadata = _decode_batch_metadata(builder, rows, 2, [7, 3, 5, 0], device)
    by_row = {c.row: c for c in metadata.recent_compactions}
    assert sorted(by_row) == [0, 1] and not metadata.compactions
    assert (by_row[0].request_slot, by_row[0].seq_len, by_row[0].view_len, by_row[0].num_candidates) == (
        7, 176, 176 - 6 * 16, (3 + 2) * 16)  # the view: 3 kept blocks and the 2 since the prompt's
    assert (by_row[1].request_slot, by_row[1].view_len, by_row[1].num_candidates) == (3, 208 - 8 * 16, 5 * 16)
    spare = vllm_config.scheduler_config.max_num_seqs
    assert metadata.request_slots.tolist() == [7, 3, 5, 0, spare, spare]
    # the view skips what earlier compactions freed: 6 prompt blocks, plus 2 per round done
    assert metadata.seq_lens.tolist() == [176 - 96, 208 - 128, 181 - 128, 41, 0, 0]
    assert metadata.block_table[1, 3].item() == 20 + 3 + 8  # row 1's view continues at block 11

    monkeypatch.setattr(prompt_lens, "_step_slots", None)  # a step the runner patch did not prepare
    with pytest.raises(RuntimeError, match="decode_interval.* need the request-state slots"):
        _decode_batch_metadata(builder, rows, 0, None, device)


def test_the_recent_query_ring_is_made_at_the_first_call_for_every_request_slot(v2_engine_config, monkeypatch,
                                                                                  device):
    """Made in the memory-profiling run (no metadata), so vLLM counts it before sizing the KV cache."""
    from vllm.config import set_current_vllm_config

    vllm_config = v2_engine_config(block_size=16, additional_config={"kv_compression": DECODE_SETTINGS})
    config = load_method_config(DECODE_SETTINGS)
    monkeypatch.setattr(impl_module, "current_method", lambda: config)
    with set_current_vllm_config(vllm_config):
        impl = impl_module.KVPressImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None, "auto")
    assert impl.recent_ring is None
    q = torch.randn(3, HEADS, HEAD_SIZE, device=device).bfloat16()
    impl.forward(None, q, q[:, :KV_HEADS], q[:, :KV_HEADS], None, None, torch.empty_like(q))
    slots = vllm_config.scheduler_config.max_num_seqs + 1
    assert impl.recent_ring.shape == (slots, 4, HEADS, HEAD_SIZE) and impl.recent_ring.dtype == torch.bfloat16
    # without decode-time eviction there is no ring
    plain = load_method_config(SETTINGS)
    monkeypatch.setattr(impl_module, "current_method", lambda: plain)
    impl = impl_module.KVPressImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None, "auto")
    impl.forward(None, q, q[:, :KV_HEADS], q[:, :KV_HEADS], None, None, torch.empty_like(q))
    assert impl.recent_ring is None
