"""Owns what every generation task produces: a `Sample` (token ids + expected strings) and the two
pieces all tasks share: chat-template rendering and fitting a prompt to a target token count.

Prompts are token ids, not strings: the grid is defined in tokens, and both engines then see
exactly the tokens that were counted (vLLM gets them as `TokensPrompt`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    task: str
    """Task name as reported, e.g. "niah" or "ruler/vt"."""
    sample_id: str
    """Unique within the task, says where the sample sits in the grid, e.g. "len2000-depth50"."""
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...]
    """Strings that must all appear in the completion (RULER's string_match_all)."""
    max_tokens: int
    """Generation budget of the completion."""
    info: dict[str, Any] = field(default_factory=dict)
    """Grid coordinates and facts for the report: target_tokens, depth_percent, ..."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class ChatRenderer:
    """Turns chat messages plus an answer prefix into prompt token ids with the model's template.

    The answer prefix is appended after the assistant header (RULER's practice): it tells a small
    instruct model what form the answer takes ("The special magic number ... is").
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, messages: list[dict[str, str]], answer_prefix: str = "") -> str:
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return rendered + answer_prefix

    def ids(self, messages: list[dict[str, str]], answer_prefix: str = "") -> list[int]:
        # The template writes any BOS itself, so no special tokens are added on top.
        return self.tokenizer.encode(self.text(messages, answer_prefix), add_special_tokens=False)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


class PromptTooShortError(ValueError):
    """Even the smallest haystack exceeds the requested context length."""


def fit_to_length(
    render: Callable[[int], list[int]], target_tokens: int, max_units: int
) -> tuple[int, list[int]]:
    """Largest haystack size (in the task's units: tokens, sentences, words) whose prompt has at
    most `target_tokens` tokens, by binary search (prompt length grows with the units).

    Args:
        render: units -> prompt token ids; must be deterministic.
        max_units: upper bound of the search (must give a prompt at least as long as the target).
    Returns:
        (units, prompt ids) of the best fit.
    """
    lo, hi = 0, max_units
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = render(mid)
        if len(ids) <= target_tokens:
            best, lo = (mid, ids), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise PromptTooShortError(
            f"the task's fixed text alone exceeds {target_tokens} tokens; use a longer length"
        )
    return best
