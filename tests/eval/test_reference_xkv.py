"""xKV on the reference engine (methods/xkv.py): once a prompt's last chunk has passed the last layer
of a group, the group's prompt keys (turned back to before RoPE) and values are replaced by one
SVD's low-rank reconstruction across the group's layers."""

import pytest
import torch
from helpers import llama_rotary_embedding

from vllm_kvpress.config import check_enabled_in_vllm, load_method_config
from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.eval.engines.reference import PromptGroupFactoring, SequencePages, rotate
from vllm_kvpress.methods.registry import method_table
from vllm_kvpress.methods.xkv import low_rank_across_layers, rank_for

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE = 6, 2, 64
PROMPT_LEN = 200  # 3 complete blocks of 64 and a partial one
COMPLETE = PROMPT_LEN // 64 * 64
rotary_embedding = llama_rotary_embedding(HEAD_SIZE)


def _prompt_pages(config, generator):
    """Every layer's pages after a prompt of PROMPT_LEN tokens (post-RoPE keys of low-rank pre-RoPE
    keys shared across layers plus noise: what makes a cross-layer basis worth finding)."""
    positions = torch.arange(PROMPT_LEN)[None]
    cos, sin = (t[0, :, None] for t in rotary_embedding(None, positions))
    shared = torch.randn(PROMPT_LEN, 8, generator=generator)
    pages, originals = [], []
    for _ in range(NUM_LAYERS):
        mix = torch.randn(8, NUM_KV_HEADS * HEAD_SIZE, generator=generator)
        pre_rope = (shared @ mix).reshape(PROMPT_LEN, NUM_KV_HEADS, HEAD_SIZE)
        pre_rope += 0.3 * torch.randn(pre_rope.shape, generator=generator)
        key = rotate(pre_rope, cos, sin)
        value = torch.randn(PROMPT_LEN, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
        layer = SequencePages(config.page_layout(HEAD_SIZE), 1, NUM_KV_HEADS, PROMPT_LEN + 8, torch.device("cpu"),
                              prompt_len=PROMPT_LEN, keep_written=True)
        layer.append(key.bfloat16(), value.bfloat16())
        pages.append(layer)
        originals.append(layer.written_keys_values())
    return pages, originals, (cos[:COMPLETE], sin[:COMPLETE])


def test_rotate_with_negated_sine_undoes_rope_as_transformers_applies_it():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(50, NUM_KV_HEADS, HEAD_SIZE)
    cos, sin = rotary_embedding(None, torch.arange(50)[None])
    _, expected = apply_rotary_pos_emb(x[None].transpose(1, 2), x[None].transpose(1, 2), cos, sin)
    rotated = rotate(x, cos[0, :, None], sin[0, :, None])
    torch.testing.assert_close(rotated, expected[0].transpose(0, 1))
    torch.testing.assert_close(rotate(rotated, cos[0, :, None], -sin[0, :, None]), x, atol=1e-5, rtol=1e-5)


def test_low_rank_across_layers_is_the_truncated_svd_of_the_layers_side_by_side():
    layers = [torch.randn(90, NUM_KV_HEADS, HEAD_SIZE) for _ in range(3)]
    joined = torch.cat([t.reshape(90, -1) for t in layers], dim=1)
    singular = torch.linalg.svdvals(joined)
    for rank in (5, 40):
        approx = low_rank_across_layers(layers, rank)
        assert [a.shape for a in approx] == [t.shape for t in layers]
        error = torch.cat([(a - t).reshape(90, -1) for a, t in zip(approx, layers, strict=True)], dim=1)
        # Eckart-Young: the best rank-r error is the norm of the singular values left out
        assert float(error.norm()) == pytest.approx(float(singular[rank:].norm()), rel=1e-4)
        assert torch.linalg.matrix_rank(torch.cat([a.reshape(90, -1) for a in approx], dim=1)) == rank
    full = low_rank_across_layers(layers, 1.0)
    for a, t in zip(full, layers, strict=True):
        torch.testing.assert_close(a, t, atol=1e-4, rtol=1e-4)


def test_the_prompt_of_each_group_is_replaced_by_its_reconstruction_after_the_groups_last_layer():
    config = load_method_config({"method": "xkv", "group_layers": 4, "rank_k": 12, "rank_v": 0.25})
    pages, originals, (cos, sin) = _prompt_pages(config, torch.Generator().manual_seed(2503))
    factoring = PromptGroupFactoring(config, config.layer_groups(NUM_LAYERS), rotary_embedding)
    assert list(factoring.last_of_group) == [3, 5]  # groups 0-3 and 4-5
    before = [layer.complete_keys_values()[0] for layer in pages]
    factoring.after_layer(2, pages)  # not the last of its group: nothing yet
    for layer, k in zip(pages, before, strict=True):
        assert torch.equal(layer.complete_keys_values()[0], k)
    for last in (3, 5):
        factoring.after_layer(last, pages)
    for group in (range(0, 4), range(4, 6)):
        keys = [rotate(originals[i][0], cos, -sin) for i in group]
        values = [originals[i][1] for i in group]
        expected_k = low_rank_across_layers(keys, 12)
        expected_v = low_rank_across_layers(values, 0.25)
        for j, i in enumerate(group):
            stored_k, stored_v = pages[i].complete_keys_values()
            # 8-bit pages of the reconstruction: within a few quantization steps of it
            torch.testing.assert_close(rotate(stored_k, cos, -sin), expected_k[j], atol=0.1, rtol=0.05)
            torch.testing.assert_close(stored_v, expected_v[j], atol=0.05, rtol=0.05)
            assert (stored_v - originals[i][1]).abs().mean() > 0.2, "random values lost rank: they changed"
            assert pages[i].num_tokens == PROMPT_LEN


def test_at_full_rank_nothing_is_lost_and_a_generated_token_factors_nothing():
    full = load_method_config({"method": "xkv", "rank_k": 1.0, "rank_v": 1.0})
    pages, originals, _ = _prompt_pages(full, torch.Generator().manual_seed(7))
    factoring = PromptGroupFactoring(full, full.layer_groups(NUM_LAYERS), rotary_embedding)
    factoring.after_layer(3, pages)
    for layer, (k, v) in zip(pages[:4], originals[:4], strict=True):
        stored_k, stored_v = layer.complete_keys_values()
        torch.testing.assert_close(stored_k, k, atol=0.05, rtol=0.05)
        torch.testing.assert_close(stored_v, v, atol=0.05, rtol=0.05)
    # a generated token after the prompt: the group is not factored again
    for layer in pages:
        token = torch.randn(2, NUM_KV_HEADS, HEAD_SIZE).bfloat16()
        layer.append(token[:1], token[1:])
    assert not pages[3].prompt_completed_now()


def test_bytes_are_the_token_coefficients_and_the_basis_in_bf16():
    config = load_method_config({"method": "xkv"})
    width = 4 * 8 * 128  # Llama-3.1-8B: a group of 4 layers of 8 KV heads of 128
    assert (rank_for(config.rank_k, width), rank_for(config.rank_v, width)) == (512, 768)  # the paper's
    ratio = config.kv_bytes_vs_bf16([16000], 32, 8, 128)
    assert ratio == pytest.approx((512 + 768) * (16000 + width) / (2 * width * 16000))
    assert 1 / ratio > 5  # the capacity bar at 16k, the basis included


def test_settings_are_checked_and_vllm_refuses_the_method_until_its_pages_exist():
    for settings, message in [({"group_layers": 0}, "group_layers=0"), ({"rank_k": 1.5}, "rank_k=1.5"),
                              ({"rank_v": 0}, "rank_v=0")]:
        with pytest.raises(KVCompressionConfigError, match=message):
            load_method_config({"method": "xkv", **settings})
    config = load_method_config({"method": "xkv", "rank_k": 1000})
    assert "rank_k=1000 exceeds the group's width 768" in " ".join(
        config.problems_for_model(head_size=64, num_kv_heads=3, max_model_len=8192))
    with pytest.raises(MethodNotImplementedError, match="'xkv' is not enabled in vLLM yet.*--engine reference"):
        check_enabled_in_vllm(config)
    (row,) = [info for info in method_table() if info.name == "xkv"]
    assert row.status == "reference engine only"
