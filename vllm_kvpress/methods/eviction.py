"""Owns the settings every token-eviction method shares: the budget, the always-kept sink and
recent window, the observation windows that score, the decode-time schedule, and the quantized
pages the kept tokens live in.

Eviction runs on the forward that completes a request's prompt (and, with `decode_interval`, again
every `decode_interval` generated tokens, over the kept tokens and those since): the last
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
decode_interval : int
    Decode-time eviction: every `decode_interval` tokens after the prompt's last full block (a
    multiple of block_size), the kept tokens and those since are scored again and `budget` of them
    kept, so a request's KV stays bounded however long it generates; 0 evicts once, after the
    prompt. Scores come from the last `decode_observation_window` queries, which each attention
    layer keeps for every running request (max_num_seqs x that many x num_heads x head_size
    elements of the model dtype per layer).
decode_observation_window : int
    Recent queries that score a decode-time eviction (at most decode_interval).
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
    decode_interval: int
    """Tokens between decode-time evictions (a multiple of block_size); 0: evict after the prompt only."""
    decode_observation_window: int
    """Recent queries that score a decode-time eviction."""

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
        check_range("decode_observation_window", self.decode_observation_window, 1, MAX_OBSERVATION_WINDOW,
                    problems)
        check_range("decode_interval", self.decode_interval, 0, 1 << 20, problems)
        if isinstance(self.decode_interval, int) and isinstance(self.block_size, int) and self.decode_interval:
            if self.decode_interval % self.block_size:
                problems.append(
                    f"decode_interval={self.decode_interval} is not allowed; allowed: 0 (evict after the "
                    f"prompt only) or a multiple of block_size={self.block_size}"
                )
            if isinstance(self.decode_observation_window, int) and self.decode_observation_window > self.decode_interval:
                problems.append(
                    f"decode_observation_window={self.decode_observation_window} exceeds decode_interval="
                    f"{self.decode_interval}; allowed: at most decode_interval (the scoring queries come "
                    "from the tokens since the last eviction)"
                )
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

    def packing(self, num_kv_heads: int) -> None:
        """No head-wise packing: every KV head keeps the same tokens (see methods/razor.py)."""
        return None

    @property
    def interval_blocks(self) -> int:
        """Decode-time eviction every this many blocks (`eviction/policy.py` `freed_end`); 0: none."""
        return self.decode_interval // self.block_size

    def kept_prompt_blocks(self, prompt_len, num_kv_heads: int | None = None):
        """Leading prompt blocks kept after compaction (`eviction/policy.py`); the same for any
        number of KV heads."""
        return kept_prompt_blocks(prompt_len, self.budget, self.block_size)
