"""The KV-head merge (convert/kv_heads.py) on small random Llama and Qwen2 models: exact where the
heads are exactly related (RoPE-aware keys at every position, values through the output
projection), never worse than mean-pooling at fitting the keys, and the saved checkpoint reloads
with fewer KV heads."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from vllm_kvpress.convert.calibration import collect_keys_values
from vllm_kvpress.convert.cli import check_kv_heads, convert_kv_heads, kv_bytes_per_token
from vllm_kvpress.convert.kv_heads import GroupStatistics, HeadMerge, rotate_pairs
from vllm_kvpress.errors import InputError

HEAD = 16


def tiny_model(kind: str, kv_heads: int = 2, heads: int = 4):
    common = dict(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=HEAD,
                  intermediate_size=96, num_hidden_layers=2, vocab_size=97, max_position_embeddings=512,
                  rope_theta=10000.0)
    config = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    config.architectures = ["LlamaForCausalLM" if kind == "llama" else "Qwen2ForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if kind == "qwen2":  # Qwen2's q/k/v biases start at zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    return model


def tie_heads_exactly(model, group: int) -> None:
    """Make every KV head of a group an exact image of the group's first: keys pair-wise complex
    multiples (what RoPE commutes with), values a linear map of the first head's."""
    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            weight = proj.weight.data.view(-1, HEAD, proj.weight.shape[1])
            bias = None if proj.bias is None else proj.bias.data.view(-1, HEAD, 1)
            for first in range(0, weight.shape[0], group):
                for j in range(first + 1, first + group):
                    if proj is attn.k_proj:
                        c = torch.randn(HEAD // 2, dtype=torch.complex64)
                        weight[j] = rotate_pairs(weight[first], c)
                        if bias is not None:
                            bias[j] = rotate_pairs(bias[first], c)
                    else:
                        mix = torch.randn(HEAD, HEAD)
                        weight[j] = mix @ weight[first]
                        if bias is not None:
                            bias[j] = mix @ bias[first]


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_heads,heads,new", [(2, 4, 1), (4, 8, 2), (4, 4, 1)])
def test_exactly_related_heads_merge_without_changing_the_logits(kind, kv_heads, heads, new):
    model = tiny_model(kind, kv_heads, heads)
    tie_heads_exactly(model, kv_heads // new)
    ids = torch.randint(0, 97, (300,)).tolist()  # positions to 300: RoPE angles wrap many times
    expected = logits(model, ids)
    windows = [torch.randint(0, 97, (128,)).tolist() for _ in range(3)]
    convert_kv_heads(model, windows, new, "svd")
    assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == new * HEAD
    torch.testing.assert_close(logits(model, ids), expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("k_heads,v_heads", [(1, 4), (4, 1), (2, 4), (1, 2)])
def test_keys_and_values_merge_to_their_own_head_counts_without_changing_the_logits(kind, k_heads, v_heads):
    """sigma-diffqkv: exactly related heads merge to K and V counts of their own; the checkpoint
    has the larger count, the other's projections repeated."""
    model = tiny_model(kind, 4, 8)
    tie_heads_exactly(model, 4)
    ids = torch.randint(0, 97, (300,)).tolist()
    expected = logits(model, ids)
    windows = [torch.randint(0, 97, (128,)).tolist() for _ in range(3)]
    convert_kv_heads(model, windows, k_heads, "svd", value_heads=v_heads)
    out = max(k_heads, v_heads)
    attn = model.model.layers[0].self_attn
    assert model.config.num_key_value_heads == out
    assert attn.k_proj.weight.shape[0] == attn.v_proj.weight.shape[0] == out * HEAD
    k_rows = attn.k_proj.weight.view(out, HEAD, -1)
    assert all(torch.equal(k_rows[h], k_rows[h // (out // k_heads) * (out // k_heads)]) for h in range(out))
    torch.testing.assert_close(logits(model, ids), expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_mean_pooling_is_exact_for_identical_heads_and_svd_is_not_needed(kind):
    model = tiny_model(kind)
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            weight = proj.weight.data.view(2, HEAD, -1)
            weight[1] = weight[0]
            if proj.bias is not None:
                proj.bias.data.view(2, HEAD)[1] = proj.bias.data.view(2, HEAD)[0]
    ids = torch.randint(0, 97, (64,)).tolist()
    expected = logits(model, ids)
    convert_kv_heads(model, [], 1, "mean")
    torch.testing.assert_close(logits(model, ids), expected, atol=2e-4, rtol=2e-4)


def _key_errors(model, windows, merge: HeadMerge) -> float:
    """Squared error of the merged keys read back per old head (kappa conj(query_weights_j)),
    summed over layer 0's calibration keys."""
    errors = []

    def measure(layer, keys, values):
        if layer:
            return
        half = HEAD // 2
        z = torch.complex(keys[..., :half].double(), keys[..., half:].double())  # [T, old, D/2]
        kappa = (z * merge.key_weights[0].T).sum(1, keepdim=True)
        readback = kappa * merge.query_weights[0].T.conj()
        errors.append(float((z - readback).abs().pow(2).sum()))

    collect_keys_values(model, windows, measure)
    return sum(errors)


def test_the_fitted_keys_are_closer_than_mean_pooled_ones():
    """The best rank-one complex fit per pair can only beat the mean (which is one such fit)."""
    model = tiny_model("llama")
    windows = [torch.randint(0, 97, (128,)).tolist() for _ in range(2)]
    stats = GroupStatistics.empty(1, 2, HEAD)
    collect_keys_values(model, windows, lambda i, k, v: stats.add(k, v) if i == 0 else None)
    fitted = _key_errors(model, windows, HeadMerge.fit(stats))
    mean = _key_errors(model, windows, HeadMerge.mean(1, 2, HEAD))
    assert fitted < 0.9 * mean, (fitted, mean)


def test_the_saved_checkpoint_reloads_with_fewer_kv_heads(tmp_path):
    model = tiny_model("qwen2")
    ids = torch.randint(0, 97, (50,)).tolist()
    windows = [torch.randint(0, 97, (64,)).tolist() for _ in range(2)]
    before = kv_bytes_per_token(model.config)
    convert_kv_heads(model, windows, 1, "svd")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.num_key_value_heads == 1
    assert kv_bytes_per_token(reloaded.config) * 2 == before
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("kv_heads,message", [(None, "allowed: 1"), (2, "allowed: 1"), (3, "allowed: 1"),
                                              (0, "allowed: 1")])
def test_kv_head_counts_that_do_not_divide_are_refused(kv_heads, message):
    with pytest.raises(InputError, match=f"--kv-heads {kv_heads}: the model has 2 KV heads; {message}"):
        check_kv_heads(tiny_model("llama").config, kv_heads)


def test_an_unknown_architecture_is_refused():
    config = tiny_model("llama").config
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(InputError, match="GPT2LMHeadModel: the converter does not know it; allowed: LlamaForCausalLM"):
        check_kv_heads(config, 1)


def test_recovery_brings_the_merged_model_closer_to_the_original():
    """The distillation lowers the KL divergence to the original on text it trains on, and it
    trains only the attention projections."""
    from vllm_kvpress.convert.recovery import distill_attention

    teacher = tiny_model("llama")
    teacher.lm_head.weight.data *= 30  # peaked next-token distributions, as a trained model's, not near uniform
    student = tiny_model("llama")
    student.load_state_dict(teacher.state_dict())
    windows = [torch.randint(0, 97, (64,)).tolist() for _ in range(2)]
    convert_kv_heads(student, windows, 1, "svd")
    embeddings = student.model.embed_tokens.weight.clone()
    losses = distill_attention(student, teacher, windows, 40, 1e-3)
    assert losses[-1] < 0.2 * losses[0], losses
    assert torch.equal(student.model.embed_tokens.weight, embeddings)
    assert not any(p.requires_grad for p in student.parameters())
