"""The config-only model directories: public values, loadable by transformers and by vLLM."""

import pytest
from transformers import AutoConfig

from vllm_kvpress.bench.models import BENCH_MODELS, get_model

PUBLIC_VALUES = {
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
}
ROPE = {
    "llama-3.1-8b": dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    "qwen2.5-7b": dict(rope_type="default", rope_theta=1000000.0),
}


@pytest.mark.parametrize("name", list(BENCH_MODELS))
def test_config_loads_with_transformers_and_has_public_values(name):
    config = AutoConfig.from_pretrained(get_model(name).config_dir)
    for key, value in PUBLIC_VALUES[name].items():
        assert getattr(config, key) == value, key
    assert config.hidden_size // config.num_attention_heads == 128  # head_dim
    assert str(config.dtype) == "torch.bfloat16"
    # transformers 5 reads the legacy rope_scaling/rope_theta keys into rope_parameters
    assert {k: config.rope_parameters[k] for k in ROPE[name]} == ROPE[name]
    # Qwen2.5 ships sliding_window=131072 with use_sliding_window=false: it must come out disabled
    assert getattr(config, "sliding_window", None) is None


@pytest.mark.parametrize("name", list(BENCH_MODELS))
def test_vllm_builds_its_model_config_from_the_directory_alone(name):
    from vllm.engine.arg_utils import EngineArgs

    model_dir = get_model(name).config_dir
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]
    model_config = EngineArgs(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, max_model_len=8704
    ).create_model_config()
    expected = PUBLIC_VALUES[name]
    assert model_config.architectures == expected["architectures"]
    assert model_config.get_head_size() == 128
    assert model_config.get_total_num_kv_heads() == expected["num_key_value_heads"]
    assert model_config.get_vocab_size() == expected["vocab_size"]
    assert str(model_config.dtype) == "torch.bfloat16"
    assert model_config.get_sliding_window() is None  # the plugin refuses sliding-window models
    assert model_config.max_model_len == 8704


def test_repo_config_dir_names_the_package_data_path():
    for model in BENCH_MODELS.values():
        assert model.config_dir.as_posix().endswith(model.repo_config_dir)
