"""MiniCache on the reference engine (methods/minicache.py): once a prompt's last chunk has passed a
pair of adjacent layers, each layer's prompt K/V is its magnitude times the pair's SLERP direction,
except the rows furthest apart in angle, which are kept."""

import math

import pytest
import torch
from helpers import llama_rotary_embedding

from vllm_kvpress.config import check_enabled_in_vllm, load_method_config
from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.eval.engines.reference import PromptGroupFactoring, SequencePages, rotate
from vllm_kvpress.methods.minicache import retained_rows, slerp_merge
from vllm_kvpress.methods.registry import method_table

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE = 7, 2, 64
PROMPT_LEN = 200  # 3 complete blocks of 64 and a partial one
COMPLETE = PROMPT_LEN // 64 * 64
rotary_embedding = llama_rotary_embedding(HEAD_SIZE)


def _slerp(u: torch.Tensor, v: torch.Tensor, t: float) -> torch.Tensor:
    """Textbook SLERP of two unit vectors, one row at a time (the oracle)."""
    angle = math.acos(max(-1.0, min(1.0, float(u @ v))))
    if math.sin(angle) < 1e-6:
        w = (1 - t) * u + t * v
        return w / w.norm()
    return (math.sin((1 - t) * angle) * u + math.sin(t * angle) * v) / math.sin(angle)


def test_slerp_merge_keeps_each_rows_magnitude_on_the_interpolated_direction_and_the_most_distant_rows():
    g = torch.Generator().manual_seed(2405)
    first = torch.randn(40, 3, 16, generator=g)
    second = first + 0.4 * torch.randn(40, 3, 16, generator=g)  # adjacent layers: close in direction
    second[5, 1] = -first[5, 1] + 0.1 * torch.randn(16, generator=g)  # one row nearly opposite
    merged_a, merged_b = slerp_merge(first, second, t=0.6, retain=0.05)
    a, b = first.reshape(-1, 16), second.reshape(-1, 16)
    angles = torch.stack([torch.acos((x / x.norm()) @ (y / y.norm())).clamp(0, math.pi) for x, y in zip(a, b)])
    kept = set(torch.topk(angles, retained_rows(0.05, 120)).indices.tolist())
    assert len(kept) == 6 and 5 * 3 + 1 in kept
    for row, (x, y, mx, my) in enumerate(zip(a, b, merged_a.reshape(-1, 16), merged_b.reshape(-1, 16))):
        if row in kept:
            assert torch.equal(mx, x) and torch.equal(my, y)
            continue
        direction = _slerp(x / x.norm(), y / y.norm(), 0.6)
        torch.testing.assert_close(mx, x.norm() * direction, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(my, y.norm() * direction, atol=1e-5, rtol=1e-5)
    # t = 1 is the deeper layer's direction: it keeps its own vectors, the other gets only its length
    _, deep = slerp_merge(first, second, t=1.0, retain=0.0)
    torch.testing.assert_close(deep, second, atol=1e-5, rtol=1e-5)


def _prompt_pages(config, generator):
    """Every layer's pages after a prompt of PROMPT_LEN tokens: each layer's KV a small turn of the
    previous layer's (what makes adjacent layers mergeable)."""
    positions = torch.arange(PROMPT_LEN)[None]
    cos, sin = (t[0, :, None] for t in rotary_embedding(None, positions))
    pre_rope = torch.randn(PROMPT_LEN, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    value = torch.randn(PROMPT_LEN, NUM_KV_HEADS, HEAD_SIZE, generator=generator)
    pages, originals = [], []
    for _ in range(NUM_LAYERS):
        pre_rope = pre_rope + 0.2 * torch.randn(pre_rope.shape, generator=generator)
        value = value + 0.2 * torch.randn(value.shape, generator=generator)
        layer = SequencePages(config.page_layout(HEAD_SIZE), 1, NUM_KV_HEADS, PROMPT_LEN + 8, torch.device("cpu"),
                              prompt_len=PROMPT_LEN, keep_written=True)
        layer.append(rotate(pre_rope, cos, sin).bfloat16(), value.bfloat16())
        pages.append(layer)
        originals.append(layer.written_keys_values())
    return pages, originals, (cos[:COMPLETE], sin[:COMPLETE])


def test_pairs_from_the_middle_are_merged_from_what_the_model_wrote_and_the_rest_keep_their_pages():
    config = load_method_config({"method": "minicache", "retain": 0.1, "bits": 8})
    assert config.layer_groups(NUM_LAYERS) == [range(3, 5), range(5, 7)]  # int(0.5 * 7) = 3
    pages, originals, (cos, sin) = _prompt_pages(config, torch.Generator().manual_seed(14366))
    before = [layer.complete_keys_values() for layer in pages]
    factoring = PromptGroupFactoring(config, config.layer_groups(NUM_LAYERS), rotary_embedding)
    for layer in range(NUM_LAYERS):
        factoring.after_layer(layer, pages)
    for i in range(3):  # before the start layer: the pages as written
        assert all(torch.equal(x, y) for x, y in zip(pages[i].complete_keys_values(), before[i], strict=True))
    for first in (3, 5):
        keys = slerp_merge(*(rotate(originals[i][0], cos, -sin) for i in (first, first + 1)), t=0.6, retain=0.1)
        values = slerp_merge(originals[first][1], originals[first + 1][1], t=0.6, retain=0.1)
        for j, i in enumerate((first, first + 1)):
            stored_k, stored_v = pages[i].complete_keys_values()
            # 8-bit pages of the merge: within a few quantization steps of it
            torch.testing.assert_close(rotate(stored_k, cos, -sin), keys[j], atol=0.06, rtol=0.05)
            torch.testing.assert_close(stored_v, values[j], atol=0.06, rtol=0.05)
            assert (stored_v - originals[i][1]).abs().mean() > 0.05, "merged values differ from the layer's own"
            assert pages[i].num_tokens == PROMPT_LEN


def test_rotation_commutes_with_the_merge():
    """Merging pre-RoPE keys (the engine's hook) equals merging the post-RoPE keys the pages hold."""
    g = torch.Generator().manual_seed(3)
    cos, sin = (t[0, :, None] for t in rotary_embedding(None, torch.arange(50)[None]))
    a, b = torch.randn(50, 2, HEAD_SIZE, generator=g), torch.randn(50, 2, HEAD_SIZE, generator=g)
    pre = slerp_merge(a, b, t=0.6, retain=0.1)
    post = slerp_merge(rotate(a, cos, sin), rotate(b, cos, sin), t=0.6, retain=0.1)
    for x, y in zip(pre, post, strict=True):
        torch.testing.assert_close(rotate(x, cos, sin), y, atol=1e-4, rtol=1e-4)


def test_bytes_count_pages_magnitudes_and_retained_rows():
    config = load_method_config({"method": "minicache"})
    # Llama-3.1-8B: 32 layers of 8 KV heads of 128; pairs from layer 16: 8 pairs, 16 layers alone
    page = config.page_layout(128).bytes_per_token_head
    rows = 16000 * 8
    kept = math.ceil(0.05 * rows)
    stored = 16 * rows * page + 8 * (rows * (page + 8) + 2 * kept * (page + 4))
    ratio = config.kv_bytes_vs_bf16([16000], 32, 8, 128)
    assert ratio == pytest.approx(stored / (32 * rows * 2 * 128 * 2))
    assert 1 / ratio > 4.5  # the capacity bar on 4-bit pages
    nothing_merged = load_method_config({"method": "minicache", "start_layer": 30}).kv_bytes_vs_bf16([16000], 32, 8,
                                                                                                       128)
    assert nothing_merged > ratio


def test_settings_are_checked_and_vllm_refuses_the_method_until_its_pages_exist():
    for settings, message in [({"t": 1.5}, "t=1.5"), ({"retain": 1.0}, "retain=1.0"), ({"bits": 2}, "bits"),
                              ({"start_layer": -1}, "start_layer=-1"), ({"start_layer": 1.0}, "start_layer=1.0")]:
        with pytest.raises(KVCompressionConfigError, match=message):
            load_method_config({"method": "minicache", **settings})
    with pytest.raises(KVCompressionConfigError, match="start_layer=29 leaves no pair of layers to merge in a model "
                                                       "of 30 layers; allowed: an index up to 28"):
        load_method_config({"method": "minicache", "start_layer": 29}).layer_groups(30)
    with pytest.raises(MethodNotImplementedError, match="'minicache' is not enabled in vLLM yet.*--engine reference"):
        check_enabled_in_vllm(load_method_config({"method": "minicache"}))
    (row,) = [info for info in method_table() if info.name == "minicache"]
    assert row.status == "reference engine only"


def test_layer_similarity_reads_alike_layers_as_mergeable_and_unrelated_ones_as_not():
    from vllm_kvpress.eval.layer_similarity import pair_similarity
    from vllm_kvpress.methods.minicache import MiniCache

    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(300, 2, 64, generator=g), torch.randn(300, 2, 64, generator=g)
    alike = pair_similarity((k, v), (1.5 * k, v), MiniCache())  # same directions, other lengths
    assert alike["cos_k"] == pytest.approx(1.0) and alike["cos_v"] == pytest.approx(1.0)
    assert alike["merge_error_k"] < 1e-5
    unrelated = pair_similarity((k, v), (torch.randn(300, 2, 64, generator=g), torch.randn(300, 2, 64, generator=g)),
                                MiniCache())
    assert abs(unrelated["cos_k"]) < 0.05 and abs(unrelated["cos_v"]) < 0.05
    assert unrelated["merge_error_k"] > 0.5
