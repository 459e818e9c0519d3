"""`tail_keys: exact` through KVPressMetadataBuilder + KVPressImpl over vLLM-shaped steps (CPU
interpreter): the builder hands every row and token its request-state slot, the cache update keeps
the partial block's keys in the layer's tail under it, and every step's attention equals the
reference engine's, whose partial blocks are exact too."""

import pytest
import torch
from helpers import impl_for, make_batch, single_request_step_metadata, v2_runner_config

from vllm_kvpress.backend import impl as impl_module
from vllm_kvpress.backend.metadata import KVPressMetadataBuilder
from vllm_kvpress.config import load_method_config
from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.eval.engines.reference import SequencePages
from vllm_kvpress.reference.attention import causal_attention

HEADS, KV_HEADS, HEAD_SIZE = 8, 2, 64  # the tiny_llama_dir model
SETTINGS = {"method": "kivi", "bits": 4, "block_size": 16, "tail_keys": "exact"}  # byte-exact encodes
# prefill chunks ending mid-block and completing one while staging into the next, then decodes
STEPS = [(0, 40), (40, 70), (70, 71), (71, 72), (72, 80), (80, 81)]
SLOT = 3


def test_steps_match_the_reference_engine(engine_config, monkeypatch, device):
    from vllm_kvpress.eviction import prompt_lens

    monkeypatch.setattr(prompt_lens, "_step_slots", None)
    vllm_config = v2_runner_config(engine_config, monkeypatch, SETTINGS, 16)
    impl = impl_for(vllm_config, monkeypatch, HEADS, KV_HEADS, HEAD_SIZE)
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    layout, bs = impl.layout, 16
    end = STEPS[-1][1]
    batch = make_batch([0], [end], KV_HEADS, HEAD_SIZE, bs, device=device)
    k_all, v_all = batch.full_k[0], batch.full_v[0]
    cache = torch.zeros(batch.block_table.max() + 1, KV_HEADS, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    reference = SequencePages(layout, 1, KV_HEADS, end, torch.device("cpu"))
    layer = torch.nn.Module()
    layer.layer_name = "model.layers.0.self_attn.attn"
    q0 = torch.randn(1, HEADS, HEAD_SIZE, device=device).bfloat16()
    impl.forward(None, q0, q0[:, :KV_HEADS], q0[:, :KV_HEADS], cache, None, torch.empty_like(q0))  # profiling run
    assert impl.exact_tail.shape == (vllm_config.scheduler_config.max_num_seqs + 1, KV_HEADS, bs, HEAD_SIZE)
    for context, seq_len in STEPS:
        slots = batch.slots(0, context, seq_len, bs).to(device)
        metadata = single_request_step_metadata(builder, batch.block_table, context, seq_len, slots, seq_len, device,
                                                request_slot=SLOT)
        assert metadata.request_slots.tolist() == [SLOT]
        assert metadata.token_slots[: seq_len - context].tolist() == [SLOT] * (seq_len - context)
        monkeypatch.setattr(impl_module, "layer_metadata", lambda name, m=metadata: m)
        k_new, v_new = k_all[context:seq_len], v_all[context:seq_len]
        impl.do_kv_cache_update(layer, k_new, v_new, cache, slots)
        q = torch.randn(seq_len - context, HEADS, HEAD_SIZE, device=device).bfloat16()
        out = torch.full_like(q, float("nan"))
        impl.forward(None, q, k_new, v_new, cache, metadata, out)
        stored_k, stored_v = reference.append(k_new.cpu(), v_new.cpu())
        if q.shape[0] > 1:  # prefill chunks attend to their own fresh K/V
            stored_k = torch.cat([stored_k[:context], k_new.cpu().float()])
            stored_v = torch.cat([stored_v[:context], v_new.cpu().float()])
        expected = causal_attention(q.cpu(), stored_k, stored_v, HEAD_SIZE ** -0.5)
        torch.testing.assert_close(out.float().cpu(), expected, atol=3e-2, rtol=2e-2)
        # the partial block's keys, exact, under the request's slot
        partial = seq_len % bs
        torch.testing.assert_close(impl.exact_tail[SLOT, :, :partial].transpose(0, 1).cpu(),
                                   k_all[seq_len - partial:seq_len].cpu(), atol=0, rtol=0)


def test_dummy_runs_without_metadata_write_nothing(engine_config, monkeypatch, device):
    """vLLM's dummy runs (memory profiling, torch.compile's warm-up) call the cache update with no
    step metadata: there is no request whose keys to keep, so the pages stay as they were (the
    compiled engine failed to start when this raised)."""
    vllm_config = v2_runner_config(engine_config, monkeypatch, SETTINGS, 16)
    impl = impl_for(vllm_config, monkeypatch, HEADS, KV_HEADS, HEAD_SIZE)
    monkeypatch.setattr(impl_module, "layer_metadata", lambda name: None)
    layer = torch.nn.Module()
    layer.layer_name = "model.layers.0.self_attn.attn"
    k = torch.randn(40, KV_HEADS, HEAD_SIZE, device=device).bfloat16()
    cache = torch.randint(0, 255, (4, KV_HEADS, impl.layout.bytes_per_head), dtype=torch.uint8, device=device)
    before = cache.clone()
    impl.do_kv_cache_update(layer, k, torch.randn_like(k), cache, torch.arange(40, device=device))
    assert torch.equal(cache, before)
    assert impl.exact_tail.shape == (vllm_config.scheduler_config.max_num_seqs + 1, KV_HEADS, 16, HEAD_SIZE)


def test_capture_steps_read_the_spare_slot(engine_config, monkeypatch, device):
    """CUDA-graph capture builds metadata without the runner's slots: every row and token reads
    the tail's spare slot, never a live request's."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    vllm_config = v2_runner_config(engine_config, monkeypatch, SETTINGS, 16)
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))

    qsl = torch.arange(5, dtype=torch.int32)
    seq = torch.full((4,), 20, dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq.to(device), _seq_lens_cpu=seq,
        num_reqs=4, num_actual_tokens=4, max_query_len=1, max_seq_len=20,
        block_table_tensor=torch.zeros(4, 2, dtype=torch.int32, device=device),
        slot_mapping=torch.zeros(4, dtype=torch.int64, device=device),
    )
    metadata = builder.build_for_cudagraph_capture(common)
    spare = vllm_config.scheduler_config.max_num_seqs
    assert metadata.request_slots.tolist() == [spare] * 4
    assert set(metadata.token_slots.tolist()) == {spare}


def test_exact_tail_refuses_vllms_v1_runner(engine_config, monkeypatch):
    """Refused when the engine config is made (vLLM's choice on a CPU platform is V1), before a model
    loads, and by the builder of a config made elsewhere."""
    message = ("tail_keys='exact' keeps each request's partial block under its request-state slot, which only "
               "vLLM's V2 model runner hands over")
    with pytest.raises(KVCompressionConfigError, match=message):
        engine_config(block_size=16, additional_config={"kv_compression": SETTINGS})
    vllm_config = v2_runner_config(engine_config, monkeypatch, SETTINGS, 16)
    monkeypatch.setattr(type(vllm_config), "use_v2_model_runner", property(lambda self: False))
    with pytest.raises(KVCompressionConfigError, match=message):
        KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device("cpu"))


def test_settings_are_checked():
    with pytest.raises(KVCompressionConfigError,
                       match="tail_keys='bf16' is not allowed; allowed: 'auto', 'exact', 'staged'"):
        load_method_config({"method": "kivi", "tail_keys": "bf16"})
    for value in ("exact", "auto"):
        with pytest.raises(KVCompressionConfigError,
                           match=f"tail_keys='{value}' is not implemented for method 'snapkv'"):
            load_method_config({"method": "snapkv", "tail_keys": value})
    assert load_method_config({"method": "gear", "tail_keys": "exact"}).page_layout(128).exact_tail_keys
    assert not load_method_config({"method": "gear", "tail_keys": "staged"}).page_layout(128).exact_tail_keys


@pytest.mark.parametrize("method", ["kivi", "gear"])
def test_auto_is_the_default_and_follows_the_model_runner(engine_config, monkeypatch, caplog, method):
    """tail_keys auto (configs/kivi.yaml, gear.yaml) becomes exact where vLLM runs its V2 model runner
    and staged, with a warning, where it runs V1; every process reads the resolved value."""
    assert load_method_config({"method": method}).tail_keys == "auto"
    with caplog.at_level("WARNING"):
        v1 = engine_config(block_size=16, additional_config={"kv_compression": {"method": method, "block_size": 16}})
    assert not v1.use_v2_model_runner  # vLLM's choice on a CPU platform
    assert v1.additional_config["kv_compression"]["tail_keys"] == "staged"
    assert "vLLM runs its V1 model runner here" in caplog.text
    assert not KVPressMetadataBuilder(None, ["layer"], v1, torch.device("cpu")).exact_tail
    caplog.clear()
    with caplog.at_level("WARNING"):
        v2 = v2_runner_config(engine_config, monkeypatch, {"method": method, "block_size": 16}, 16)
    assert v2.additional_config["kv_compression"]["tail_keys"] == "exact"
    assert "V1 model runner" not in caplog.text
    assert KVPressMetadataBuilder(None, ["layer"], v2, torch.device("cpu")).exact_tail
