"""razor through KVPressMetadataBuilder + KVPressImpl over vLLM-shaped steps (CPU interpreter): the
step that completes the prompt packs it head-wise, and later decode steps attend, per KV head, to
that head's own tokens: all of them for a retrieval head, sink + compensation + window for the
other, then the tail and the generated tokens for both; and the reference engine's pages give the
same attention at every step."""

from types import SimpleNamespace

import torch
from helpers import make_batch, single_request_step_metadata
from vllm.config import set_current_vllm_config

from vllm_kvpress.backend import impl as impl_module
from vllm_kvpress.backend.block_manager import EvictionBlockManager
from vllm_kvpress.backend.metadata import KVPressMetadataBuilder
from vllm_kvpress.config import load_method_config
from vllm_kvpress.eval.engines.reference import PAGES_KWARG, SequencePages, compressed_attention_forward
from vllm_kvpress.methods.razor import Razor
from vllm_kvpress.reference import page_codec

HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 64  # the tiny_llama_dir model (2 layers)
SETTINGS = {"method": "razor", "block_size": 16, "window": 27, "sink": 4, "retrieval_heads": 1,
            "head_choice": "first"}
PROMPT = 150  # 9 full blocks + a tail of 6; every head keeps K = 2 blocks (4 + 1 + 27 tokens)
KEPT, CHUNKS, MIDDLE = 2, 7, 4  # the retrieval head's 7 other blocks packed into ceil(7 / 2) = 4
STEPS = [(0, 128), (128, 150), (150, 151), (151, 152)]
LAYER = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")


def _metadata(builder, block_table, context, seq_len, slot_mapping, device):
    return single_request_step_metadata(builder, block_table, context, seq_len, slot_mapping, PROMPT, device)


def test_razor_packs_the_prompt_once_and_each_head_decodes_over_its_own_tokens(v2_engine_config, monkeypatch,
                                                                                device):
    vllm_config = v2_engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    config = load_method_config(SETTINGS)
    monkeypatch.setattr(impl_module, "current_method", lambda: config)
    monkeypatch.setattr(Razor, "packed_heads", lambda self, model_config, num_kv_heads: [[0], [1]])
    with set_current_vllm_config(vllm_config):  # as vLLM builds the model's layers
        impl = impl_module.KVPressImpl(HEADS, HEAD_SIZE, HEAD_SIZE ** -0.5, KV_HEADS, None, None, "auto")
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    layout, bs = impl.layout, 16
    assert config.kept_prompt_blocks(PROMPT, KV_HEADS) == KEPT + MIDDLE
    batch = make_batch([0], [STEPS[-1][1]], KV_HEADS, HEAD_SIZE, bs, device=device)
    k_all, v_all = batch.full_k[0], batch.full_v[0]
    cache = torch.zeros(batch.block_table.max() + 1, KV_HEADS, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    ranks = [-1, 0]  # layer 1's retrieval head is KV head 1
    reference = SequencePages(layout, 1, KV_HEADS, STEPS[-1][1], torch.device("cpu"), eviction=config,
                              prompt_len=PROMPT, retrieval_index=ranks)
    for context, seq_len in STEPS:
        slots = batch.slots(0, context, seq_len, bs).to(device)
        metadata = _metadata(builder, batch.block_table, context, seq_len, slots, device)
        assert len(metadata.compactions) == (1 if seq_len == PROMPT else 0)
        packed = context >= PROMPT
        assert metadata.headwise_rows.tolist() == [[KEPT, CHUNKS, MIDDLE] if packed else [0, 0, 0]]
        shifted = 9 - (KEPT + MIDDLE) if packed else 0
        assert int(metadata.seq_lens[0]) == seq_len - shifted * bs
        k_new, v_new = k_all[context:seq_len], v_all[context:seq_len]
        impl.do_kv_cache_update(None, k_new, v_new, cache, slots)
        if seq_len == PROMPT:
            stored_k, stored_v = page_codec.read_sequence(cache.cpu(), batch.block_table[0].cpu(), PROMPT, layout)
        q = torch.randn(seq_len - context, HEADS, HEAD_SIZE, device=device).bfloat16()
        out = torch.full_like(q, float("nan"))
        impl.forward(LAYER, q, k_new, v_new, cache, metadata, out)
        seen_k, seen_v = (x[:seq_len].cpu().transpose(0, 1)[None] for x in (k_all, v_all))
        expected = compressed_attention_forward(
            SimpleNamespace(layer_idx=0), q.cpu().transpose(0, 1)[None], seen_k, seen_v,
            attention_mask=None, scaling=HEAD_SIZE ** -0.5, **{PAGES_KWARG: [reference]},
        )[0][0]
        torch.testing.assert_close(out.float().cpu(), expected.float(), atol=3e-2, rtol=2e-2)
        assert (reference.headwise is not None) == (seq_len >= PROMPT)
        if not packed:
            continue
        view = metadata.block_table[0].cpu()
        for h in range(HEADS):
            kv = h // (HEADS // KV_HEADS)
            k, v = page_codec.read_head_sequence(cache.cpu(), view, kv, ranks[kv], int(metadata.seq_lens[0]),
                                                 layout, kept=KEPT, chunks=CHUNKS, middle=MIDDLE, retrieval_heads=1)
            weights = torch.softmax(k @ q[0, h].float().cpu() * HEAD_SIZE ** -0.5, 0)
            torch.testing.assert_close(out[0, h].float().cpu(), weights @ v, atol=3e-2, rtol=2e-2)
        # what each head holds is what razor keeps of the prompt (one more 8-bit round trip)
        for kv, want in ((1, stored_k[:144, 1]), (0, torch.cat([stored_k[:4, 0], stored_k[4:144 - 27, 0].mean(0)[None],
                                                                 stored_k[144 - 27:144, 0]]))):
            k, _ = page_codec.read_head_sequence(cache.cpu(), view, kv, ranks[kv], int(metadata.seq_lens[0]),
                                                 layout, kept=KEPT, chunks=CHUNKS, middle=MIDDLE, retrieval_heads=1)
            torch.testing.assert_close(k[: want.shape[0]], want, atol=0.05, rtol=0.02)


def test_the_block_manager_frees_what_packing_does_not_need():
    from vllm_kvpress.backend.spec import KVPressEvictionSpec
    from vllm_kvpress.headwise_layout import HeadPacking

    spec = KVPressEvictionSpec(block_size=16, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, head_size_v=HEAD_SIZE,
                               dtype=torch.uint8, bytes_per_head=100, compression_tag="razor",
                               budget=load_method_config(SETTINGS).budget,
                               middle_packing=HeadPacking(retrieval_heads=1, kv_heads=KV_HEADS))
    assert spec.packing.retrieval_heads == 1 and spec.packing.kv_heads == KV_HEADS
    freed = []
    manager = EvictionBlockManager.__new__(EvictionBlockManager)
    manager.kv_cache_spec, manager.block_size = spec, 16
    manager._remove_blocks_in_range = lambda request_id, start, end: freed.append((start, end))
    manager.remove_skipped_blocks("r", PROMPT, PROMPT)
    assert freed == [(KEPT + MIDDLE, PROMPT // 16)]


def test_razor_refuses_tensor_parallelism_and_too_many_heads(cpu_platform, tiny_llama_dir):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvpress.engine_args import engine_args_problems

    config = load_method_config(SETTINGS)
    args = EngineArgs(model=tiny_llama_dir, tensor_parallel_size=2)
    assert any("--tensor-parallel-size 2 is not supported by method 'razor'" in p
               for p in engine_args_problems(args, config))
    too_many = load_method_config({**SETTINGS, "retrieval_heads": 3})
    assert any("retrieval_heads=3 exceeds the model's 2 KV heads" in p
               for p in too_many.problems_for_model(head_size=64, num_kv_heads=2, max_model_len=4096))


def test_a_chunk_over_packed_pages_skips_flashattention(v2_engine_config, monkeypatch, device):
    """FlashAttention's varlen layout has one context length per sequence; a packed row's heads have
    their own, so a prompt chunk over packed pages goes to the Triton prefill kernel."""
    vllm_config = v2_engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    builder.fa_version = 3  # what a Hopper GPU gets
    block_table = torch.randperm(16, dtype=torch.int32, device=device)[None]
    for context, seq_len, packed in [(0, 150, False), (150, 160, True)]:
        slots = torch.zeros(seq_len - context, dtype=torch.int64, device=device)
        metadata = _metadata(builder, block_table, context, seq_len, slots, device)
        assert (metadata.flash_prefill is None) == packed
        assert metadata.headwise_rows.tolist() == [[KEPT, CHUNKS, MIDDLE] if packed else [0, 0, 0]]
