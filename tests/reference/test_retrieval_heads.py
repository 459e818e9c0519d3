"""Retrieval-head scores (RazorAttention): the probe's scoring, the per-layer choice, the shipped files."""

import json

import pytest
import torch

from vllm_kvpress.eval import retrieval_heads as probe
from vllm_kvpress.methods import retrieval_heads as rh

PERIOD, REPEATS = 8, 3


def _attention_of(kind: str) -> torch.Tensor:
    """[seq, seq] causal weights of a head that copies (`induction`, `echo`) or spreads (`uniform`)."""
    seq = PERIOD * REPEATS
    weights = torch.tril(torch.ones(seq, seq))
    weights = weights / weights.sum(-1, keepdim=True)
    for q in range(PERIOD, seq):
        target = q - PERIOD + (1 if kind == "induction" else 0)
        if kind != "uniform":
            weights[q] = 0.0
            weights[q, target] = 1.0
    return weights


def test_the_probe_scores_induction_and_echo_heads_apart():
    layer = torch.stack([_attention_of("induction"), _attention_of("echo"), _attention_of("uniform")])
    induction, echo = probe.copy_scores([layer], PERIOD)
    assert induction.shape == echo.shape == (1, 3)
    assert induction[0, 0] == 1.0 and echo[0, 0] == 0.0
    assert echo[0, 1] == 1.0 and induction[0, 1] == 0.0
    assert 0.0 < induction[0, 2] < 0.2 and 0.0 < echo[0, 2] < 0.2  # spread over every earlier token


def test_a_kv_head_scores_as_its_highest_query_head():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.0, 0.05]])  # 6 query heads, GQA 3
    assert probe.kv_head_scores(scores, 2).tolist() == [[pytest.approx(0.9), pytest.approx(0.3)]]


def test_each_layer_keeps_its_top_heads_by_induction_plus_echo():
    scores = {"induction": [[0.1, 0.5, 0.0], [0.0, 0.0, 0.0]], "echo": [[0.5, 0.0, 0.2], [0.0, 0.3, 0.0]]}
    assert rh.retrieval_heads_by_layer(scores, 1) == [[0], [1]]  # 0.6 beats 0.5; ties go to the lower head
    assert rh.retrieval_heads_by_layer(scores, 2) == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="retrieval_heads 4: allowed: 0 to 3"):
        rh.retrieval_heads_by_layer(scores, 4)


def test_the_default_share_is_about_fifteen_percent_and_never_zero():
    assert [rh.default_heads_per_layer(h) for h in (2, 3, 8, 32)] == [1, 1, 2, 5]


def test_the_scores_file_is_found_by_the_models_architecture(tmp_path):
    config = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 64, "vocab_size": 100, "rope_theta": 1e4}
    (tmp_path / "other.json").write_text(json.dumps({"fingerprint": {"model_type": "qwen2"}}))
    (tmp_path / "tiny.json").write_text(json.dumps({"fingerprint": rh.model_fingerprint(config), "echo": [[1, 2]]}))
    assert rh.find_scores(config, tmp_path)["echo"] == [[1, 2]]
    with pytest.raises(FileNotFoundError, match=r"have: other.json, tiny.json.*vllm-kvpress retrieval-heads"):
        rh.find_scores(dict(config, num_hidden_layers=3), tmp_path)


def test_the_shipped_smollm2_scores_match_its_architecture_and_find_its_copy_heads():
    smollm2 = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
               "hidden_size": 576, "vocab_size": 49152}
    scores = rh.find_scores(smollm2)  # the installed configs/razor/
    assert scores["format"] == rh.SCORE_FORMAT and scores["method"] == "razor"
    assert len(scores["induction"]) == len(scores["echo"]) == 30
    assert all(len(row) == 3 for row in scores["induction"] + scores["echo"])
    # a real model has a few strong copy heads and many weak ones
    strongest = max(max(i + e for i, e in zip(ri, re)) for ri, re in zip(scores["induction"], scores["echo"]))
    weakest = min(min(i + e for i, e in zip(ri, re)) for ri, re in zip(scores["induction"], scores["echo"]))
    assert strongest > 0.3 and weakest < 0.01


def test_measure_runs_the_probe_on_a_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=200, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    scores = probe.measure(str(tmp_path), tokens=16, repeats=3, seed=0)
    assert scores["fingerprint"]["num_key_value_heads"] == 2
    assert len(scores["induction"]) == 2 and all(len(row) == 2 for row in scores["induction"])
    assert all(0.0 <= x <= 1.0 for row in scores["induction"] + scores["echo"] for x in row)
    text = probe.format_scores(scores)
    assert json.loads(text) == scores and "[" + ", ".join(map(str, scores["echo"][0])) + "]" in text
