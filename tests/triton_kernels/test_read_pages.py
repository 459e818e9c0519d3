"""triton_kernels/read_pages.py against reference/page_codec.read_sequence (TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch
from helpers import layout_for, make_batch
from vllm_kvpress.triton_kernels.cache_write import write_kv_pages
from vllm_kvpress.triton_kernels.read_pages import read_pages

from vllm_kvpress.reference import page_codec

CASES = [
    ("kivi", {"bits": 8}, 64, 3),
    ("kivi", {"bits": 2, "group_size": 32, "block_size": 16}, 128, 2),
    ("gear", {"bits": 4}, 64, 1),
]


@pytest.mark.parametrize("method,settings,head_size,kv_heads", CASES)
@pytest.mark.parametrize("num_tokens", [64, 150])  # whole blocks; complete blocks + a staged one
def test_read_pages_equals_reference(method, settings, head_size, kv_heads, num_tokens, device):
    layout, iters = layout_for(method, head_size, **settings)
    batch = make_batch([0], [num_tokens], kv_heads, head_size, layout.block_size, device=device)
    cache = torch.zeros(batch.block_table.max() + 1, kv_heads, layout.bytes_per_head, dtype=torch.uint8,
                        device=device)
    write_kv_pages(batch.full_k[0], batch.full_v[0], cache, batch.slots(0, 0, num_tokens, layout.block_size).to(device),
                   layout, power_iters=iters)
    k_ref, v_ref = page_codec.read_sequence(cache, batch.block_table[0], num_tokens, layout)
    k, v = read_pages(cache, batch.block_table[0], num_tokens, layout)
    assert k.shape == (num_tokens, kv_heads, head_size) and k.dtype == torch.float32
    # the same dequantization math on the same bytes (fp32 products may round differently)
    torch.testing.assert_close(k, k_ref, atol=1e-5 * k_ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(v, v_ref, atol=1e-5 * v_ref.abs().max().item(), rtol=0)
    # and the dequantized tokens are the written ones, within the quantization error
    assert (k - batch.full_k[0].float()).abs().max() < 0.5 * batch.full_k[0].float().abs().max()


def test_read_pages_rejects_short_block_list(device):
    layout, _ = layout_for("kivi", 64)
    cache = torch.zeros(4, 1, layout.bytes_per_head, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match="need 2 blocks"):
        read_pages(cache, torch.tensor([0], dtype=torch.int32, device=device), 65, layout)
