"""SentenceKV on the reference engine (methods/sentencekv.py, eviction/sentences.py): sentences of the
kept prompt tokens get the mean of their keys; each decode step attends to the sentences its
sentence's mean query scores highest, within the budget, plus the sink and the recent tokens."""

import pytest
import torch

from vllm_kvpress.config import check_enabled_in_vllm, load_method_config
from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.eval.engines.reference import retrieved_attention
from vllm_kvpress.eviction.sentences import SentenceIndex, sentence_end_ids, sentence_of_tokens
from vllm_kvpress.methods.registry import method_table
from vllm_kvpress.reference.attention import causal_attention

END = 5  # the token id of "." in these tests


def test_a_sentence_end_belongs_to_the_sentence_it_closes():
    assert sentence_of_tokens([1, 2, END, 3, END, END, 4, 4], frozenset({END})).tolist() == [0, 0, 0, 1, 1, 2, 3, 3]


def test_sentence_ends_are_the_tokens_whose_text_is_punctuation():
    class Tokenizer:
        texts = ["the", ".", " .", "!", "...", "Mr.", "\n", "?\n", " cat"]

        def __len__(self):
            return len(self.texts)

        def decode(self, ids):
            return "".join(self.texts[i] for i in ids)

    assert sentence_end_ids(Tokenizer()) == {1, 2, 3, 4, 7}


def _index(generator, num_kv_heads=2, head_size=8):
    """A prompt of 40 positions in sentences of 5 tokens; each head kept 24 of them (its own)."""
    sentence_of_position = torch.arange(40) // 5
    positions = torch.stack([torch.randperm(40, generator=generator)[:24].sort().values for _ in range(num_kv_heads)])
    keys = torch.randn(24, num_kv_heads, head_size, generator=generator)
    return SentenceIndex.from_prompt(positions, sentence_of_position, keys), positions, sentence_of_position, keys


def test_a_sentence_vector_is_the_mean_of_its_kept_keys_per_head():
    index, positions, sentence_of_position, keys = _index(torch.Generator().manual_seed(1))
    for h in range(2):
        for j in range(8):
            slots = [c for c in range(24) if sentence_of_position[positions[h, c]] == j]
            expected = keys[slots, h].mean(0) if slots else torch.zeros(8)
            torch.testing.assert_close(index.vectors[h, j], expected)


def test_a_step_attends_to_the_sink_the_recent_and_the_best_sentences_within_the_budget():
    g = torch.Generator().manual_seed(2)
    index, _, _, keys = _index(g)
    num_heads, budget, sink, recent = 6, 14, 2, 3
    queries = [torch.randn(num_heads, 8, generator=g) for _ in range(2)]
    stored = keys
    for query in queries:  # two generated tokens, no sentence end: the second step retrieves
        stored = torch.cat([stored, torch.randn(1, 2, 8, generator=g)])
        index.step(query, stored, closes_sentence=False)
    slots = index.attended_slots(budget, sink, recent)
    num_slots = stored.shape[0]  # 26: the 24 prompt slots and 2 generated (pending)
    mean_query = torch.stack(queries).mean(0).reshape(2, 3, 8).sum(1)
    for h in range(2):
        forced = set(range(sink)) | set(range(num_slots - recent, num_slots))
        order = (index.vectors[h] @ mean_query[h]).argsort(descending=True).tolist()
        expected = []
        for j in order:  # sentence after sentence, each in slot order, until the budget is full
            expected += [c for c in range(24) if index.slot_sentence[h, c] == j and c not in forced]
        expected = sorted(forced | set(expected[: budget - len(forced)]))
        assert slots[h].tolist() == expected and len(expected) == budget


def test_short_current_sentences_and_small_caches_attend_to_everything_and_an_end_indexes_the_sentence():
    g = torch.Generator().manual_seed(3)
    index, _, _, keys = _index(g)
    stored = torch.cat([keys, torch.randn(1, 2, 8, generator=g)])
    index.step(torch.randn(6, 8, generator=g), stored, closes_sentence=False)
    assert index.attended_slots(10, 2, 2) is None  # one token in the current sentence
    stored = torch.cat([stored, torch.randn(1, 2, 8, generator=g)])
    index.step(torch.randn(6, 8, generator=g), stored, closes_sentence=False)
    assert index.attended_slots(26, 2, 2) is None  # everything fits
    stored = torch.cat([stored, torch.randn(1, 2, 8, generator=g)])
    index.step(torch.randn(6, 8, generator=g), stored, closes_sentence=True)
    assert index.vectors.shape[1] == 9 and index.current == []
    torch.testing.assert_close(index.vectors[:, 8], stored[-3:].mean(0))
    assert (index.slot_sentence[:, -3:] == 8).all()


def test_retrieved_attention_is_each_groups_attention_over_its_heads_slots():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 6, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    torch.testing.assert_close(retrieved_attention(q, k, v, 0.3, None), causal_attention(q, k, v, 0.3))
    slots = [torch.tensor([0, 3, 19]), torch.tensor([1, 2, 5, 19])]
    out = retrieved_attention(q, k, v, 0.3, slots)
    for h, index in enumerate(slots):
        expected = causal_attention(q[:, 3 * h : 3 * h + 3], k[index, h : h + 1], v[index, h : h + 1], 0.3)
        torch.testing.assert_close(out[:, 3 * h : 3 * h + 3], expected)


def test_settings_are_checked_and_vllm_refuses_the_method_until_its_cpu_tier_exists():
    config = load_method_config({"method": "sentencekv", "budget": 0.25, "gpu_budget": 0.125})
    assert config.sentence_budget(2000) == 250 and config.retrieves_sentences
    for settings, message in [({"gpu_budget": 64}, "gpu_budget=64 leaves no room"),
                              ({"gpu_budget": 4096}, "gpu_budget=4096 exceeds budget=2048"),
                              ({"gpu_budget": 1.5}, "gpu_budget=1.5"),
                              ({"decode_interval": 64}, "decode_interval=64 is not allowed for sentencekv")]:
        with pytest.raises(KVCompressionConfigError, match=message):
            load_method_config({"method": "sentencekv", **settings})
    with pytest.raises(MethodNotImplementedError, match="'sentencekv' is not enabled in vLLM yet.*--engine reference"):
        check_enabled_in_vllm(load_method_config({"method": "sentencekv"}))
    (row,) = [info for info in method_table() if info.name == "sentencekv"]
    assert row.status == "reference engine only"
