"""Owns the settings every token-eviction method shares: the budget, the always-kept sink and
recent window, the observation window that scores, and the quantized pages the kept tokens live in.

Eviction runs once per request, on the forward that completes its prompt: the last
`observation_window` prompt queries score every prompt token (per KV head), the method keeps
`budget` tokens (the `sink` first and `window` most recent among them), the worker compacts them
into the request's first blocks and the block manager returns the rest to vLLM's free pool
(`vllm_kvpress/eviction/`). The kept tokens are stored in KIVI-style pages (`bits`, `group_size`,
`block_size`), so eviction composes with quantization: 8 bits is near lossless, 4 bits multiplies
the saving by about 3.5.

Parameters (defaults in configs/<method>.yaml)
----------
budget : int or float
    Prompt tokens kept per request and KV head: an integer count (at least one block), or a
    fraction of the prompt in (0, 1). Rounded up to whole blocks.
window : int
    Most recent prompt tokens always kept (part of the budget).
sink : int
    First prompt tokens always kept (attention sinks; part of the budget).
observation_window : int
    Last prompt queries whose attention scores the tokens (SnapKV's observation window).
"""

from dataclasses import dataclass

from vllm_kvpress.eviction.policy import kept_prompt_blocks
from vllm_kvpress.methods.base import check_range
from vllm_kvpress.methods.kivi import KiviConfig

MAX_OBSERVATION_WINDOW = 512


@dataclass(frozen=True)
class EvictionConfig(KiviConfig):
    budget: int | float
    """Kept prompt tokens per request and KV head (int), or a fraction of the prompt (float)."""
    window: int
    """Most recent prompt tokens always kept."""
    sink: int
    """First prompt tokens always kept."""
    observation_window: int
    """Last prompt queries that score the tokens."""

    @property
    def evicts_tokens(self) -> bool:
        return True

    def problems(self) -> list[str]:
        problems = super().problems()
        if isinstance(self.budget, float):
            if not 0.0 < self.budget < 1.0:
                problems.append(
                    f"budget={self.budget!r} is not allowed; allowed: a fraction of the prompt in (0, 1) "
                    "or a token count (integer)"
                )
        elif isinstance(self.budget, int) and not isinstance(self.budget, bool):
            if isinstance(self.block_size, int) and self.budget < self.block_size:
                problems.append(
                    f"budget={self.budget} is not allowed; allowed: at least one block "
                    f"(block_size={self.block_size}) of tokens, or a fraction in (0, 1)"
                )
        else:
            problems.append(f"budget={self.budget!r} is not allowed; allowed: a token count or a fraction in (0, 1)")
        check_range("window", self.window, 0, 1 << 20, problems)
        check_range("sink", self.sink, 0, 1 << 20, problems)
        check_range("observation_window", self.observation_window, 1, MAX_OBSERVATION_WINDOW, problems)
        if (
            isinstance(self.budget, int) and not isinstance(self.budget, bool)
            and isinstance(self.window, int) and isinstance(self.sink, int)
            and self.window + self.sink > self.budget
        ):
            problems.append(
                f"window={self.window} + sink={self.sink} exceed budget={self.budget}; "
                "allowed: window + sink <= budget"
            )
        return problems

    def problems_for_model(self, *, head_size: int, num_kv_heads: int, max_model_len: int) -> list[str]:
        problems = super().problems_for_model(
            head_size=head_size, num_kv_heads=num_kv_heads, max_model_len=max_model_len
        )
        if isinstance(self.budget, int) and self.budget > max_model_len:
            problems.append(
                f"budget={self.budget} is larger than the model's max_model_len={max_model_len}, so nothing "
                f"would ever be evicted; allowed: a token count up to {max_model_len}, or a fraction in (0, 1)"
            )
        return problems

    def kept_prompt_blocks(self, prompt_len):
        """Leading prompt blocks kept after compaction (`eviction/policy.py`)."""
        return kept_prompt_blocks(prompt_len, self.budget, self.block_size)
