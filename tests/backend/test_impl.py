"""KVPressImpl + KVPressMetadataBuilder on a mixed vLLM batch, against the reference (CPU interpreter)."""

from types import SimpleNamespace

import pytest
import torch
from helpers import make_batch
from vllm.forward_context import ForwardContext, override_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm_kvpress.triton_kernels import cache_write as cache_write_module
from vllm_kvpress.triton_kernels.cache_write import completing_tokens

from vllm_kvpress.backend import impl as impl_module
from vllm_kvpress.backend.metadata import KVPressMetadataBuilder, num_decode_splits
from vllm_kvpress.config import load_method_config
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import paged_attention


def _must_not_be_called(*args, **kwargs):
    raise AssertionError("the cache write made its own completing-token list instead of the builder's")


def _common_metadata(batch, device) -> CommonAttentionMetadata:
    qsl = batch.query_start_loc()
    return CommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(batch.seq_lens, dtype=torch.int32, device=device),
        num_reqs=len(batch.seq_lens), num_actual_tokens=int(qsl[-1]), max_query_len=max(batch.query_lens),
        max_seq_len=max(batch.seq_lens), block_table_tensor=batch.block_table,
        slot_mapping=batch.new_slots(64).to(device),
    )


@pytest.mark.parametrize("method", ["kivi", "gear"])
def test_impl_serves_a_mixed_batch_like_the_reference(method, engine_config, monkeypatch, device):
    vllm_config = engine_config(additional_config={"kv_compression": {"method": method}})
    config = load_method_config(vllm_config.additional_config["kv_compression"])
    monkeypatch.setattr(impl_module, "current_method", lambda: config)
    heads, kv_heads, head_size = 8, 2, 64  # the tiny_llama_dir model
    impl = impl_module.KVPressImpl(heads, head_size, head_size ** -0.5, kv_heads, None, None, "auto")
    builder = KVPressMetadataBuilder(None, ["layer"], vllm_config, torch.device(device))
    layout = impl.layout
    # 3 decodes then 2 prefills (one continuing a context), as vLLM reorders them
    batch = make_batch([64, 100, 5, 70, 0], [1, 1, 1, 40, 77], kv_heads, head_size, layout.block_size, device=device)
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8, device=device)
    def write(k, v, slots):
        impl.do_kv_cache_update(None, k, v, cache, slots)

    batch.write_context(write, layout.block_size)
    common = _common_metadata(batch, device)
    metadata = builder.build(0, common)
    assert (metadata.num_decodes, metadata.num_prefills, metadata.num_decode_tokens) == (3, 2, 3)
    # this step's write as vLLM calls it: inside the forward context, which holds the builder's
    # list of block-completing rows (so the write must not make its own)
    expected_completing = completing_tokens(common.slot_mapping.cpu(), layout.block_size,
                                            metadata.completing_tokens.shape[0])
    assert torch.equal(metadata.completing_tokens.cpu(), expected_completing)
    assert int((expected_completing >= 0).sum()) > 0  # the batch does complete blocks
    monkeypatch.setattr(cache_write_module, "completing_tokens", _must_not_be_called)
    context = ForwardContext(no_compile_layers={}, attn_metadata={"layer": metadata}, slot_mapping={})
    with override_forward_context(context):
        k_new, v_new = batch.write_new(lambda k, v, slots: impl.do_kv_cache_update(
            SimpleNamespace(layer_name="layer"), k, v, cache, slots), layout.block_size)
    q = torch.randn(common.num_actual_tokens, heads, head_size, device=device).bfloat16()
    out = torch.full_like(q, float("nan"))
    impl.forward(None, q, k_new, v_new, cache, metadata, out)
    expected = paged_attention(
        q.cpu(), k_new.cpu(), v_new.cpu(), batch.query_start_loc().tolist(), batch.seq_lens,
        lambda i, s: page_codec.read_sequence(cache.cpu(), batch.block_table[i].cpu(), s, layout), head_size ** -0.5,
    )
    torch.testing.assert_close(out.float().cpu(), expected, atol=2e-2, rtol=1.6e-2)


def test_profiling_run_returns_zeros(monkeypatch):
    monkeypatch.setattr(impl_module, "current_method", lambda: load_method_config({"method": "kivi"}))
    impl = impl_module.KVPressImpl(8, 64, 0.125, 2, None, None, "auto")
    out = torch.randn(3, 8, 64)
    impl.forward(None, out, out, out, torch.empty(0), None, out)
    assert out.eq(0).all()


@pytest.mark.parametrize("feature,kwargs", [
    ("sliding window", {"sliding_window": 4096}),
    ("ALiBi", {"alibi_slopes": [0.5] * 8}),
    ("logits soft cap", {"logits_soft_cap": 30.0}),
])
def test_unsupported_model_features_are_named(feature, kwargs, monkeypatch):
    monkeypatch.setattr(impl_module, "current_method", lambda: load_method_config({"method": "kivi"}))
    args = dict(alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto") | kwargs
    with pytest.raises(NotImplementedError, match=f"does not support {feature}"):
        impl_module.KVPressImpl(8, 64, 0.125, 2, **args)


def test_splits_fill_the_gpu_and_depend_only_on_batch_size():
    assert num_decode_splits(1, 8, num_sms=132) == 32  # capped
    assert num_decode_splits(16, 8, num_sms=132) == 5  # 16 * 8 * 5 >= 4 * 132
    assert num_decode_splits(256, 8, num_sms=132) == 1
