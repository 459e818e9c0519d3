"""Multi-turn generation: the asked fact is stated in the intended earlier turn, lengths on target."""

import re

import pytest

from vllm_kvpress.eval import multiturn

LENGTH = 1000


@pytest.fixture(scope="module")
def samples(tokenizer):
    return multiturn.build_samples(tokenizer, [LENGTH], 3, seed=0)


def test_deterministic_and_cycles_over_the_fact_turns(tokenizer, samples):
    again = multiturn.build_samples(tokenizer, [LENGTH], 3, seed=0)
    assert [s.prompt_ids for s in again] == [s.prompt_ids for s in samples]
    assert [s.info["asked"] for s in samples] == list(multiturn.FACT_NAMES)


def test_asked_code_is_stated_in_its_turn_and_asked_last(tokenizer, samples):
    for s in samples:
        text = tokenizer.decode(s.prompt_ids)
        user_turns = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, flags=re.DOTALL)
        assert len(user_turns) == multiturn.NUM_TURNS + 1
        code = s.answers[0]
        stated_in = [i for i, turn in enumerate(user_turns) if f"is {code}." in turn]
        assert stated_in == [s.info["fact_turn"]], s.sample_id
        assert user_turns[-1].startswith("What is the access code of my")
        assert code not in user_turns[-1]


def test_prompt_length_is_on_target(samples):
    for s in samples:
        assert 0.97 * LENGTH <= s.num_prompt_tokens <= LENGTH, (s.sample_id, s.num_prompt_tokens)


@pytest.mark.parametrize("asked", [0, 1, 2])
def test_three_distinct_facts_per_conversation(tokenizer, samples, asked):
    text = tokenizer.decode(samples[asked].prompt_ids)
    codes = re.findall(r"please remember this: the access code of my [\w ]+ is (\d+)\.", text)
    assert len(set(codes)) == len(multiturn.FACT_TURNS)
