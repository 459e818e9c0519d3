"""Scoring: RULER's string_match_all, per-task counts, perplexity."""

import math

import pytest

from vllm_kvpress.eval.scoring import is_correct, perplexity, score_task, string_match_all


def test_string_match_all_counts_each_reference_case_insensitively():
    assert string_match_all("The codes are ABC and 123.", ["abc", "123"]) == 1.0
    assert string_match_all("The codes are ABC.", ["abc", "123"]) == 0.5
    assert string_match_all("nothing here", ["abc", "123", "x1"]) == 0.0


def test_string_match_all_needs_references():
    with pytest.raises(ValueError, match="at least one"):
        string_match_all("text", [])


def test_is_correct_needs_every_reference():
    assert is_correct(" 4821937.", ["4821937"])
    assert not is_correct(" 482193.", ["4821937"])  # a truncated number is wrong
    assert not is_correct("A B", ["a", "b", "c"])


def test_score_task_counts_correct_and_partial_credit():
    score = score_task("ruler/vt", ["X Y Z", "X", "none"], [("x", "y", "z"), ("x", "y"), ("q",)])
    assert (score.num_correct, score.num_samples) == (1, 3)
    assert score.accuracy == pytest.approx(100 / 3)
    assert score.string_match_all == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert score.to_dict()["correct"] == 1 and score.to_dict()["total"] == 3


def test_score_task_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions for 1 samples"):
        score_task("niah", ["a", "b"], [("a",)])


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity([1.0, 2.0, 3.0]) == pytest.approx(math.exp(2.0))
