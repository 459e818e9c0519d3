"""The eviction schedule (`policy.freed_end`, `kept_blocks`): which blocks are freed once a
request has computed a given number of tokens, with and without decode-time eviction."""

from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvpress.eviction.policy import HeadPacking, compacts, freed_end, kept_blocks, kept_prompt_blocks
from vllm_kvpress.eviction.view import shift_blocks

BS = 16


def test_prompt_only_frees_the_prompt_range_once_the_prompt_is_computed():
    # P = 150: 9 full blocks and a tail; budget 48 keeps 3
    ends = [freed_end(150, n, 48, BS) for n in (0, 149, 150, 151, 5000)]
    assert ends == [3, 3, 9, 9, 9]


def test_decode_rounds_free_every_interval_after_the_prompts_last_full_block():
    # rounds at (9 + 2 m) * 16 tokens: 176, 208, ...
    ends = [freed_end(150, n, 48, BS, None, 2) for n in (150, 175, 176, 207, 208, 240)]
    assert ends == [9, 9, 11, 11, 13, 15]


def test_a_prompt_within_the_budget_frees_only_once_decode_tokens_exceed_it():
    # P = 40 keeps its 2 full blocks; decode-time eviction keeps the budget's 4 blocks, rounds at 2 + m
    assert kept_blocks(40, 64, BS) == 2 and kept_blocks(40, 64, BS, None, 1) == 4
    ends = [freed_end(40, n, 64, BS, None, 1) for n in (40, 64, 79, 80, 96)]
    assert ends == [4, 4, 4, 5, 6]


@pytest.mark.parametrize("interval", [0, 1])
def test_padding_rows_never_free(interval):
    padding, tokens = np.zeros(3, dtype=np.int64), np.array([0, 16, 4096])
    kept = kept_blocks(padding, 48, BS, None, interval)
    assert (freed_end(padding, tokens, 48, BS, None, interval) == kept).all()
    assert shift_blocks(padding, tokens, 48, BS, None, interval).tolist() == [0, 0, 0]


def test_decode_time_eviction_refuses_head_wise_packing():
    with pytest.raises(ValueError, match="does not pack heads"):
        kept_blocks(1000, 64, BS, HeadPacking(1, 4), 2)


@settings(max_examples=200, deadline=None)
@given(prompt=st.integers(1, 3000), budget=st.one_of(st.integers(BS, 800), st.floats(0.01, 0.99)),
       interval=st.sampled_from([0, 1, 2, 5]), tokens=st.lists(st.integers(0, 6000), min_size=2, max_size=8))
def test_the_schedule_only_grows_and_bounds_what_a_request_holds(prompt, budget, interval, tokens):
    tokens = sorted(tokens)
    kept = kept_blocks(prompt, budget, BS, None, interval)
    ends = [freed_end(prompt, n, budget, BS, None, interval) for n in tokens]
    assert all(a <= b for a, b in pairwise(ends))  # freed blocks never come back
    for n, end in zip(tokens, ends):
        assert end >= kept
        held = -(-n // BS) - (end - kept)  # the request's blocks minus the freed ones
        if n < prompt:
            assert end == kept
        elif not interval:  # the prompt-only rule of the earlier code
            assert end - kept == (prompt // BS - kept if compacts(prompt, budget, BS) else 0)
            assert kept == kept_prompt_blocks(prompt, budget, BS)
        elif end > max(prompt // BS, kept):  # after a decode round: kept + at most T + 1 blocks
            assert held <= kept + interval + 1
            assert (end - prompt // BS) % interval == 0
    # the view's shift is the freed count before a step
    assert shift_blocks([prompt], [tokens[-1]], budget, BS, None, interval).tolist() == [ends[-1] - kept]
