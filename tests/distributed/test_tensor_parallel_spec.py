"""Tensor parallelism: every rank reports the same compressed KV-cache spec (vLLM's scheduler frees
blocks for all ranks at once and asserts identical specs), sized by the rank's local KV heads,
including when KV heads are replicated because there are fewer of them than ranks."""

import pytest
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_kvpress.backend.spec import compressed_spec_for_layer
from vllm_kvpress.config import load_method_config

GiB = 1 << 30
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


def _local_kv_heads(total_kv_heads: int, tp_size: int) -> int:
    """vLLM's rule (ModelConfig.get_num_kv_heads): split KV heads over ranks, replicate if fewer."""
    return max(1, total_kv_heads // tp_size)


@pytest.mark.parametrize("total_kv_heads,tp_size", [(8, 2), (2, 4), (3, 3)])
def test_ranks_agree_on_the_spec_and_vllm_accepts_it(engine_config, total_kv_heads, tp_size):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    cfg = engine_config(additional_config={"kv_compression": {"method": "gear", "bits": 2}})
    local = _local_kv_heads(total_kv_heads, tp_size)
    per_rank = []
    for _rank in range(tp_size):  # each rank builds its spec from the pickled config alone
        base = FullAttentionSpec(block_size=64, num_kv_heads=local, head_size=64, dtype=torch.bfloat16)
        per_rank.append({name: compressed_spec_for_layer(base, cfg) for name in LAYERS})
    assert all(specs == per_rank[0] for specs in per_rank)
    layout = load_method_config(cfg.additional_config["kv_compression"]).page_layout(64)
    assert per_rank[0][LAYERS[0]].page_size_bytes == layout.page_size_bytes(local)
    configs = get_kv_cache_configs(cfg, per_rank, [GiB] * tp_size)
    assert len({c.num_blocks for c in configs}) == 1
