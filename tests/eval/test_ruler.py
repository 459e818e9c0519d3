"""RULER generation: deterministic, every expected answer is really derivable from the prompt."""

import collections
import re

import pytest

from vllm_kvpress.eval import ruler

LENGTH = 1000


@pytest.fixture(scope="module")
def samples(tokenizer):
    return {
        s.task.split("/")[1]: s
        for s in ruler.build_samples(tokenizer, list(ruler.TASKS), [LENGTH], 1, seed=0)
    }


def _context(tokenizer, sample, instruction_end: str, question: str) -> str:
    text = tokenizer.decode(sample.prompt_ids)
    return text[text.index(instruction_end) + len(instruction_end) : text.index(question)]


def test_every_task_is_built_deterministically(tokenizer, samples):
    assert set(samples) == set(ruler.TASKS)
    again = {
        s.task.split("/")[1]: s
        for s in ruler.build_samples(tokenizer, list(ruler.TASKS), [LENGTH], 1, seed=0)
    }
    assert {t: s.prompt_ids for t, s in again.items()} == {t: s.prompt_ids for t, s in samples.items()}
    other = ruler.build_samples(tokenizer, ["niah_single_1", "vt"], [LENGTH], 1, seed=7)
    assert [s.answers for s in other] != [samples["niah_single_1"].answers, samples["vt"].answers]


def test_prompt_lengths_are_on_target(samples):
    for task, s in samples.items():
        assert ruler.MIN_FILL * LENGTH <= s.num_prompt_tokens <= LENGTH, (task, s.num_prompt_tokens)


def test_single_needle_value_is_stated_once_in_noise(tokenizer, samples):
    s = samples["niah_single_1"]
    text = tokenizer.decode(s.prompt_ids)
    assert text.count(s.answers[0]) == 1
    key = re.search(r"special magic number for (\S+) mentioned", text).group(1)
    assert f"for {key} is: {s.answers[0]}." in text
    assert text.count("The grass is green.") > 20


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_multikey_3"])
def test_multikey_answer_belongs_to_the_asked_key_among_distractors(tokenizer, samples, task):
    s = samples[task]
    text = tokenizer.decode(s.prompt_ids)
    key = re.search(r"special magic \w+ for (\S+) mentioned in the provided text\?", text).group(1)
    pairs = dict(re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", text))
    assert len(pairs) > 5, "distractor needles are missing"
    assert pairs[key] == s.answers[0]


def test_multivalue_all_values_belong_to_the_key(tokenizer, samples):
    s = samples["niah_multivalue"]
    text = tokenizer.decode(s.prompt_ids)
    key = re.search(r"all the special magic numbers for (\S+) mentioned", text).group(1)
    found = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", text)
    assert sorted(found) == sorted(s.answers) and len(found) == ruler.NUM_MULTIVALUE


def test_variable_tracking_chain_leads_from_the_value_to_every_answer(tokenizer, samples):
    s = samples["vt"]
    text = tokenizer.decode(s.prompt_ids)
    value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
    assignments = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", text))
    reached = {name for name, rhs in assignments.items() if rhs == value}
    while True:
        more = {name for name, rhs in assignments.items() if rhs.startswith("VAR ") and rhs[4:] in reached}
        if more <= reached:
            break
        reached |= more
    assert reached == set(s.answers) and len(reached) == ruler.VT_HOPS + 1


def test_common_words_are_the_most_common(tokenizer, samples):
    s = samples["cwe"]
    context = _context(tokenizer, s, ruler.CWE_INSTRUCTION, ruler.CWE_QUESTION)
    counts = collections.Counter(re.findall(r"\d+\. (\w+)", context))
    least_common_answer = min(counts[w] for w in s.answers)
    others = [c for w, c in counts.items() if w not in s.answers]
    assert least_common_answer == ruler.common_word_frequency(LENGTH) > max(others)


def test_frequent_words_are_the_top_three(tokenizer, samples):
    s = samples["fwe"]
    context = _context(tokenizer, s, ruler.FWE_INSTRUCTION.strip(), ruler.FWE_QUESTION.strip())
    counts = collections.Counter(w for w in context.split() if w != "...")
    top = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:3]]
    assert top == list(s.answers)


def test_unknown_task_names_the_flag_and_the_allowed_values(tokenizer):
    with pytest.raises(ValueError, match=r"--ruler-tasks qa_1 unknown; allowed: niah_single_1"):
        ruler.build_samples(tokenizer, ["qa_1"], [LENGTH], 1, seed=0)
