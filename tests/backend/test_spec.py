"""Page math: our spec's page size is the layout's, and vLLM's own block accounting gives the
compression ratio in extra blocks (vLLM 0.26.0 `get_kv_cache_configs`, run on CPU)."""

import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvpress.backend.spec import KVPressAttentionSpec, compressed_spec_for_layer
from vllm_kvpress.config import load_method_config
from vllm_kvpress.errors import KVCompressionConfigError

GiB = 1 << 30


def _bf16_spec(block_size: int) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)


@pytest.mark.parametrize("settings", [{"method": "kivi"}, {"method": "kivi", "bits": 2}, {"method": "gear"},
                                      {"method": "gear", "bits": 2}])
def test_vllm_hands_out_compression_ratio_times_more_tokens(engine_config, settings):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    cfg = engine_config(additional_config={"kv_compression": settings})
    spec = compressed_spec_for_layer(_bf16_spec(64), cfg)
    layout = load_method_config(settings).page_layout(64)
    assert isinstance(spec, KVPressAttentionSpec) and spec.dtype == torch.uint8
    assert spec.page_size_bytes == 2 * layout.bytes_per_head

    layers = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    ours = get_kv_cache_configs(cfg, [{name: spec for name in layers}], [GiB])[0]
    plain = get_kv_cache_configs(cfg, [{name: _bf16_spec(16) for name in layers}], [GiB])[0]
    tokens_ours, tokens_plain = ours.num_blocks * 64, plain.num_blocks * 16
    assert tokens_ours / tokens_plain == pytest.approx(layout.compression_vs_bf16, rel=2e-3)


def test_spec_resolves_to_the_full_attention_manager():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    spec = KVPressAttentionSpec(block_size=64, num_kv_heads=2, head_size=64, dtype=torch.uint8, bytes_per_head=4096,
                                compression_tag="x")
    KVCacheSpecRegistry._ensure_registered()
    assert KVCacheSpecRegistry.get_manager_class(spec) is FullAttentionManager


def test_merge_keeps_the_layout_and_rejects_mixed_layouts():
    a = KVPressAttentionSpec(block_size=64, num_kv_heads=2, head_size=64, dtype=torch.uint8, bytes_per_head=4096,
                             compression_tag="x")
    assert KVPressAttentionSpec.merge([a, a]) == a
    b = KVPressAttentionSpec(block_size=64, num_kv_heads=2, head_size=64, dtype=torch.uint8, bytes_per_head=2048,
                             compression_tag="y")
    # AssertionError is what vLLM's is_kv_cache_spec_uniform reads as "group the layers by type"
    with pytest.raises(AssertionError, match="share one page layout"):
        KVPressAttentionSpec.merge([a, b])


def test_block_size_mismatch_is_named(engine_config):
    cfg = engine_config(additional_config={"kv_compression": {"method": "kivi"}})
    with pytest.raises(KVCompressionConfigError, match="vLLM chose block size 16 but method 'kivi' was configured"):
        compressed_spec_for_layer(_bf16_spec(16), cfg)


@pytest.mark.parametrize("settings,head_size,bytes_per_token_head", [
    ({"method": "kivi", "bits": 4}, 128, 144), ({"method": "kivi", "bits": 2}, 128, 80),
    ({"method": "gear", "bits": 4}, 128, 152), ({"method": "gear", "bits": 2}, 128, 90),
    ({"method": "kivi", "bits": 4}, 64, 72), ({"method": "gear", "bits": 4}, 64, 80),
    ({"method": "gear", "bits": 2}, 64, 50), ({"method": "gear", "bits": 4, "outliers": 16}, 128, 154),
    ({"method": "gear", "bits": 4, "outliers": 16}, 64, 82), ({"method": "gear", "bits": 4, "outliers": 32}, 128, 156),
])
def test_documented_page_sizes(settings, head_size, bytes_per_token_head):
    """The sizes quoted in docs/quantized_pages.md and configs/*.yaml."""
    layout = load_method_config(settings).page_layout(head_size)
    assert layout.bytes_per_token_head == bytes_per_token_head
    assert layout.bytes_per_head % 16 == 0


def test_gear_outlier_slots_follow_the_bit_width_unless_set():
    from vllm_kvpress.methods.gear import AUTO_OUTLIERS
    from vllm_kvpress.methods.kivi import ALLOWED_BITS

    assert sorted(AUTO_OUTLIERS) == sorted(ALLOWED_BITS)
    assert [load_method_config({"method": "gear", "bits": b}).page_layout(128).num_outliers for b in (2, 4, 8)] == [
        16, 0, 0]
    assert load_method_config({"method": "gear", "bits": 4, "outliers": 32}).page_layout(128).num_outliers == 32
    assert load_method_config({"method": "gear", "bits": 2, "outliers": 0}).page_layout(128).num_outliers == 0
    with pytest.raises(KVCompressionConfigError,
                       match=r"outliers='some' is not allowed; allowed: 0, 16, 32, 64, 'auto'"):
        load_method_config({"method": "gear", "outliers": "some"})
