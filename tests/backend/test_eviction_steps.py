"""An evicting method through KVPressMetadataBuilder + KVPressImpl over vLLM-shaped steps (CPU
interpreter): the step that completes the prompt compacts it, later steps attend over kept + tail +
new tokens through the compacted view, exactly as the reference engine does."""

import pytest
import torch
from helpers import make_batch, single_request_step_metadata

from vllm_kvpress.backend import impl as impl_module
from vllm_kvpress.backend.metadata import KVPressMetadataBuilder
from vllm_kvpress.config import load_method_config
from vllm_kvpress.eval.engines.reference import SequencePages
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import causal_attention

HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 64  # the tiny_llama_dir model
SETTINGS = {"method": "snapkv", "budget": 48, "block_size": 16, "window": 8, "sink": 4, "observation_window": 8}
PROMPT = 150  # 9 full blocks of 16 + a tail of 6; the budget keeps 3 blocks
STEPS = [(0, 128), (128, 150), (150, 151), (151, 152)]  # (context, seq_len): two prefill chunks, two decodes


def _metadata(builder, block_table, context, seq_len, slot_mapping, device):
    return single_request_step_metadata(builder, block_table, context, seq_len, slot_mapping, PROMPT, device)


def _reference_step(reference, q, k_new, v_new):
    """The reference engine's attention for a step of the worker (prefill chunks attend to their
    fresh K/V), and the stored tokens its `append` returned."""
    stored_k, stored_v = reference.append(k_new.cpu(), v_new.cpu())
    attended_k, attended_v = stored_k, stored_v
    if q.shape[0] > 1:
        past = reference.num_tokens - q.shape[0]
        attended_k = torch.cat([stored_k[:past], k_new.cpu().float()])
        attended_v = torch.cat([stored_v[:past], v_new.cpu().float()])
    return causal_attention(q.cpu(), attended_k, attended_v, HEAD_SIZE ** -0.5), stored_k, stored_v


@pytest.mark.parametrize("budget", [48, 0.3])  # 0.3 x 150 = 45 tokens -> 3 blocks as well
def test_prompt_is_compacted_once_and_decode_reads_the_view(budget, engine_config, monkeypatch, device):
    settings = {**SETTINGS, "budget": budget}
    vllm_config = engine_config(block_size=16, additional_config={"kv_compression": settings})
    # vLLM picks its V1 runner on a CPU platform (no Triton backend there); on the GPU it is V2
    monkeypatch.setattr(type(vllm_config), "use_v2_model_runner", property(lambda self: True))
    config = load_method_config(settings)
    monkeypatch.setattr(impl_module, "current_method_config", lambda: config)
    impl = impl_module.KVPressImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None, "auto")
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    layout, bs = impl.layout, 16
    batch = make_batch([0], [STEPS[-1][1]], KV_HEADS, HEAD_SIZE, bs, device=device)
    k_all, v_all = batch.full_k[0], batch.full_v[0]
    cache = torch.zeros(batch.block_table.max() + 1, KV_HEADS, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    reference = SequencePages(layout, 1, KV_HEADS, STEPS[-1][1], torch.device("cpu"), eviction=config,
                              prompt_len=PROMPT)
    for context, seq_len in STEPS:
        slots = batch.slots(0, context, seq_len, bs).to(device)
        metadata = _metadata(builder, batch.block_table, context, seq_len, slots, device)
        assert len(metadata.compactions) == (1 if seq_len == PROMPT else 0)
        shifted = 9 - 3 if context >= PROMPT else 0
        assert int(metadata.seq_lens[0]) == seq_len - shifted * bs
        assert metadata.block_table[0, 3].item() == batch.block_table[0, 3 + shifted].item()
        k_new, v_new = k_all[context:seq_len], v_all[context:seq_len]
        impl.do_kv_cache_update(None, k_new, v_new, cache, slots)
        q = torch.randn(seq_len - context, HEADS, HEAD_SIZE, device=device).bfloat16()
        out = torch.full_like(q, float("nan"))
        impl.forward(None, q, k_new, v_new, cache, metadata, out)
        torch.testing.assert_close(out.float().cpu(), _reference_step(reference, q, k_new, v_new)[0],
                                   atol=3e-2, rtol=2e-2)
        if reference.evicts_now():
            reference.evict_prompt(q.cpu().float(), *page_codec.read_sequence(
                reference.cache, torch.arange(reference.cache.shape[0]), PROMPT, layout), HEAD_SIZE ** -0.5)
    assert reference.num_tokens == 3 * bs + 6 + 2


def test_eviction_refuses_vllms_v1_runner(engine_config):
    # on a CPU platform vLLM picks its V1 runner, which never hands the builder prompt lengths
    vllm_config = engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    assert not vllm_config.use_v2_model_runner
    with pytest.raises(Exception, match="evicts tokens and needs vLLM's V2 model runner"):
        KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device("cpu"))


def test_flashattention_prefill_plans_over_the_compacted_view(engine_config, monkeypatch, device):
    """The varlen plan a GPU with FlashAttention gets counts the tokens the kernels see: the whole
    table while the prompt is prefilled, the compacted view for a chunk after the compaction."""
    vllm_config = engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    monkeypatch.setattr(type(vllm_config), "use_v2_model_runner", property(lambda self: True))
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
    from vllm.config import set_current_vllm_config

    from vllm_kvpress.eviction import prompt_lens
    from vllm_kvpress.eviction.policy import freed_end

    monkeypatch.setattr(prompt_lens, "_step_slots", None)
    vllm_config = engine_config(block_size=16, additional_config={"kv_compression": DECODE_SETTINGS})
    monkeypatch.setattr(type(vllm_config), "use_v2_model_runner", property(lambda self: True))
    config = load_method_config(DECODE_SETTINGS)
    monkeypatch.setattr(impl_module, "current_method_config", lambda: config)
    with set_current_vllm_config(vllm_config):
        impl = impl_module.KVPressImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None, "auto")
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    layout, bs = impl.layout, 16
    batch = make_batch([0], [DECODE_END], KV_HEADS, HEAD_SIZE, bs, device=device)
    k_all, v_all = batch.full_k[0], batch.full_v[0]
    cache = torch.zeros(batch.block_table.max() + 1, KV_HEADS, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    reference = SequencePages(layout, 1, KV_HEADS, DECODE_END, torch.device("cpu"), eviction=config,
                              prompt_len=PROMPT)
    steps = [(0, 128), (128, PROMPT)] + [(n, n + 1) for n in range(PROMPT, DECODE_END)]
    rounds = []
    for context, seq_len in steps:
        slots = batch.slots(0, context, seq_len, bs).to(device)
        metadata = single_request_step_metadata(builder, batch.block_table, context, seq_len, slots, PROMPT, device,
                                                request_slot=2)
        if metadata.recent_compactions:
            rounds.append(seq_len)
            (compaction,) = metadata.recent_compactions
            assert (compaction.request_slot, compaction.kept_blocks) == (2, 3)
            assert compaction.num_candidates == compaction.view_len == (3 + 1) * bs  # kept + the block since
        shifted = freed_end(PROMPT, context, 48, bs, None, 1) - 3
        assert int(metadata.seq_lens[0]) == seq_len - shifted * bs
        assert int(metadata.request_slots[0]) == 2
        k_new, v_new = k_all[context:seq_len], v_all[context:seq_len]
        impl.do_kv_cache_update(None, k_new, v_new, cache, slots)
        q = torch.randn(seq_len - context, HEADS, HEAD_SIZE, device=device).bfloat16()
        out = torch.full_like(q, float("nan"))
        impl.forward(None, q, k_new, v_new, cache, metadata, out)
        expected, stored_k, stored_v = _reference_step(reference, q, k_new, v_new)
        torch.testing.assert_close(out.float().cpu(), expected, atol=3e-2, rtol=2e-2)
        reference.compact_if_due(q.cpu(), stored_k, stored_v, HEAD_SIZE ** -0.5)
    assert rounds == [160, 176]
    # the request holds its 3 kept blocks and the 2 tokens since the last round
    assert reference.num_tokens == 3 * bs + 2 and reference.num_evicted == DECODE_END - (3 * bs + 2)
