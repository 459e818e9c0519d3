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


def test_position_samples_put_the_question_at_the_beginning_middle_or_end_of_a_last_passage(tokenizer):
    samples = multiturn.build_samples(tokenizer, [LENGTH], 9, seed=0, positions=multiturn.QUESTION_POSITIONS)
    pairs = [(s.info["asked"], s.info["question_at"]) for s in samples]
    assert sorted(pairs) == sorted((f, p) for f in multiturn.FACT_NAMES for p in multiturn.QUESTION_POSITIONS)
    for s in samples:
        assert s.task == f"multiturn-position/{s.info['question_at']}"
        assert 0.97 * LENGTH <= s.num_prompt_tokens <= LENGTH, (s.sample_id, s.num_prompt_tokens)
        text = tokenizer.decode(s.prompt_ids)
        user_turns = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, flags=re.DOTALL)
        assert len(user_turns) == multiturn.NUM_TURNS + 1
        last = user_turns[-1]
        assert s.answers[0] not in last and "One more passage from my reading" in last
        start = last.index("What is the access code of my")
        end = last.index("Answer with the number only.") + len("Answer with the number only.")
        intro = "One more passage from my reading:"
        before = len(last[:start].replace(intro, "").split())  # passage words around the question
        after = len(last[end:].replace(intro, "").split())
        expected = {"beginning": before == 0 and after > 20, "middle": 0.7 < before / max(after, 1) < 1.5,
                    "end": before > 20 and after == 0}
        assert expected[s.info["question_at"]], (s.sample_id, before, after)
        stated_in = [i for i, turn in enumerate(user_turns) if f"is {s.answers[0]}." in turn]
        assert stated_in == [s.info["fact_turn"]], s.sample_id
