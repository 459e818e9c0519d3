"""Workloads: the fixed shapes, deterministic prompts without special tokens, engine sharing."""

import json
from dataclasses import replace

import numpy as np
import pytest

from vllm_kvpress.bench.models import BENCH_MODELS
from vllm_kvpress.bench.workloads import (
    WORKLOADS,
    Workload,
    group_by_engine,
    make_prompts,
    next_turn_prompt,
    resolve_workloads,
)

EXPECTED_SHAPES = {
    # name: (model, requests, prompt, output, turns)
    "long-prompt": ("llama-3.1-8b", 64, 8000, 512, 1),
    "decode-heavy": ("llama-3.1-8b", 96, 4000, 1500, 1),
    "long-16k": ("llama-3.1-8b", 64, 16000, 512, 1),
    "long-16k-192": ("llama-3.1-8b", 192, 16000, 512, 1),
    "multi-turn": ("llama-3.1-8b", 32, 4000, 256, 4),
}


@pytest.mark.parametrize("name", list(EXPECTED_SHAPES))
def test_workload_prompts_have_the_stated_shape(name):
    model, requests, prompt_len, output_len, turns = EXPECTED_SHAPES[name]
    workload = WORKLOADS[name]
    assert (
        workload.model,
        workload.num_requests,
        workload.prompt_len,
        workload.output_len,
        workload.turns,
    ) == EXPECTED_SHAPES[name]
    prompts = make_prompts(workload, seed=0)
    assert len(prompts.first_prompts) == requests
    assert {len(p) for p in prompts.first_prompts} == {prompt_len}
    if turns > 1:
        assert np.shape(prompts.follow_ups) == (requests, turns - 1, workload.follow_up_len)
    else:
        assert prompts.follow_ups == []
    assert workload.max_context_len <= workload.max_model_len


def test_prompts_are_deterministic_and_differ_by_seed_and_workload():
    a = make_prompts(WORKLOADS["decode-heavy"], seed=0)
    assert make_prompts(WORKLOADS["decode-heavy"], seed=0) == a
    assert make_prompts(WORKLOADS["decode-heavy"], seed=1).first_prompts != a.first_prompts
    # A and B run on one engine: a shared prefix would turn into prefix-cache hits.
    b = make_prompts(WORKLOADS["long-prompt"], seed=0)
    assert a.first_prompts[0][:16] != b.first_prompts[0][:16]
    assert len({tuple(p[:16]) for p in a.first_prompts}) == len(a.first_prompts)


@pytest.mark.parametrize("model", list(BENCH_MODELS))
def test_prompt_tokens_are_ordinary_tokens_of_the_model(model):
    info = BENCH_MODELS[model]
    workload = resolve_workloads("multi-turn", model=model)[0]
    prompts = make_prompts(workload, seed=0)
    ids = np.concatenate([np.ravel(prompts.first_prompts), np.ravel(prompts.follow_ups)])
    assert ids.min() >= 0 and ids.max() < info.num_ordinary_tokens
    assert ids.dtype.kind == "i"
    # The boundary is the tokenizer's first special token; BOS/EOS of config.json lie above it.
    config = json.loads((info.config_dir / "config.json").read_text())
    specials = [config["bos_token_id"], *np.ravel([config["eos_token_id"]]).tolist()]
    assert min(specials) >= info.num_ordinary_tokens
    assert info.num_ordinary_tokens < config["vocab_size"]


def test_multi_turn_context_arithmetic():
    workload = WORKLOADS["multi-turn"]
    # turn t resends prompt + t * (output + follow-up)
    assert workload.prompt_lens == [4000, 5256, 6512, 7768]
    assert workload.max_context_len == 7768 + 256
    history = next_turn_prompt([1, 2], [3], [4, 5])
    assert history == [1, 2, 3, 4, 5]


def test_aliases_and_engine_groups():
    workloads = resolve_workloads("A,B,multi-turn,long-16k")
    assert [w.name for w in workloads] == ["long-prompt", "decode-heavy", "multi-turn", "long-16k"]
    groups = group_by_engine(workloads)
    assert [[w.name for w in g] for g in groups.values()] == [
        ["long-prompt", "decode-heavy", "multi-turn"],
        ["long-16k"],
    ]
    assert [w.name for w in resolve_workloads("ctx-sweep")] == ["ctx-2k", "ctx-4k", "ctx-8k", "ctx-16k"]
    assert resolve_workloads("A,long-prompt") == [WORKLOADS["long-prompt"]]


def test_model_override_moves_workloads():
    (workload,) = resolve_workloads("B", model="qwen2.5-7b")
    assert workload.model == "qwen2.5-7b" and workload.num_requests == 96
    assert workload.engine_key == ("qwen2.5-7b", WORKLOADS["decode-heavy"].max_model_len)


@pytest.mark.parametrize(
    "names, message",
    [
        ("A,Z", "'Z' is unknown; allowed: long-prompt"),
        ("", "--workloads is empty"),
    ],
)
def test_bad_workload_names_say_what_is_allowed(names, message):
    with pytest.raises(ValueError, match=message) as info:
        resolve_workloads(names)
    if "unknown" in message:
        assert "A (= long-prompt)" in str(info.value)


def test_bad_model_name_says_what_is_allowed():
    with pytest.raises(ValueError, match="allowed: llama-3.1-8b, qwen2.5-7b"):
        resolve_workloads("A", model="llama-2")


def test_workload_table_guards_its_context():
    with pytest.raises(ValueError, match="exceed max_model_len"):
        replace(WORKLOADS["long-prompt"], max_model_len=8000)
    with pytest.raises(ValueError, match="follow_up_len"):
        Workload("x", "llama-3.1-8b", 1, 10, 10, 100, turns=2)


def test_workload_dict_round_trip():
    for workload in WORKLOADS.values():
        assert Workload.from_dict(json.loads(json.dumps(workload.to_dict()))) == workload


@pytest.mark.parametrize("name", ["long-prompt", "decode-heavy", "long-16k"])
def test_the_warm_up_fills_the_context_so_prefill_chunks_read_a_cached_one(name):
    from vllm_kvpress.bench.configs import EngineOptions
    from vllm_kvpress.bench.workloads import WORKLOADS, warmup_for

    chunk = EngineOptions().max_num_batched_tokens

    workload = WORKLOADS[name]
    warm = warmup_for(workload.model, workload.max_model_len)
    assert warm.max_context_len == workload.max_model_len and warm.model == workload.model
    # longer than a prefill chunk wherever the workload's own prompts are
    if workload.prompt_len > chunk:
        assert warm.prompt_len > chunk
    assert warm.prompt_len >= workload.prompt_len
