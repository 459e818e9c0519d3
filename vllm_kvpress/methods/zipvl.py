"""ZipVL: a layer-adaptive share of important tokens, found from the attention mass, kept at high
precision, the rest at low precision; long prompts prefill over the important tokens only.

Based on "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and KV
Cache Compression" (https://arxiv.org/abs/2410.08584, the mixed-precision version of the paper).
Instead of a fixed budget, each layer keeps the fewest tokens that hold a share `tau` of the
attention its probe queries pay (eviction/attention_mass.py): a layer whose attention is
concentrated needs few, a diffuse one many.

- Decode: on the forward that completes the prompt, each layer's important tokens (ranked by
  normalized attention from the last `observation_window` prompt queries) are written at
  `high_bits`, every other prompt token at `low_bits`, in the mixed-precision pages of `mikv`
  (vllm_kvpress/mixed_layout.py, docs/mixed_precision.md); the blocks after them go back to vLLM.
- Prefill: a prompt of at least `sparse_prefill_from` tokens is prefilled chunk by chunk with each
  chunk's queries attending to its own tokens and, of the context before it, only the tokens that
  hold `tau` of its last `observation_window` queries' attention (the probes), plus the `sink` and
  the `window` most recent: attention cost grows with the important tokens, not the context.

Deviations from the paper, and why:

- Memory follows a cap, not the adaptive count. vLLM's scheduler frees a request's blocks on a
  schedule it computes from the prompt length alone, identical on every tensor-parallel rank, and
  one block table serves every layer; a count that depends on each layer's attention can decide
  which tokens are high precision, not how many blocks a request holds. So `budget` reserves the
  high-precision tokens per request (every layer the same), and each layer fills them with its
  ranking. The count `tau` chooses is what the layer would need: where it is below the cap the
  surplus holds the next-ranked tokens at high precision (better than the paper, same bytes); where
  it is above, the layer is capped. The share each layer asked for is reported (`eval`'s
  `important_share_by_layer`; the reference engine also logs it at debug level).
- Probe queries are the last `observation_window` queries (of the prompt for the split, of each
  chunk for the sparse prefill); the paper adds randomly sampled ones.
- Sparse prefill works at the granularity of vLLM's chunked prefill: within a chunk attention is
  dense and causal; the context before it is what gets sparse. A prompt's first chunk has no
  context, so it is dense.
- In vLLM the sparse prefill runs in the FlashAttention prefill (backend/flash_prefill.py
  `sparse_keys_values`: the context a chunk attends to is gathered per layer before FlashAttention
  runs); a step that would run the Triton prefill kernel instead is refused. The decode is mikv's.

Parameters (defaults: the fields below; `vllm-kvpress methods zipvl`)
----------
tau : float
    Share of the probe queries' attention mass the important tokens must hold, in (0, 1).
budget : int or float
    The cap: high-precision tokens reserved per request and KV head (a count or a share of the
    prompt in (0, 1), rounded up to whole blocks; sink and window included).
high_bits, low_bits : int
    Code widths of the important tokens (4 or 8) and of the others (2 or 4, below high_bits).
sparse_prefill_from : int
    Prompts of at least this many tokens prefill sparsely; 0 turns sparse prefill off.
window, sink, observation_window, pages, group_size, block_size, tail_keys : as for mikv.
"""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vllm_kvpress.methods.base import Family, MethodInfo, check_range
from vllm_kvpress.methods.eviction import EVICTION_PAGES, highest_free
from vllm_kvpress.methods.kivi import Kivi
from vllm_kvpress.methods.mikv import MiKV

if TYPE_CHECKING:  # torch is imported where the rule runs: listing or validating methods stays light
    import torch

    from vllm_kvpress.eviction.scoring import WindowStats

MAX_PROMPT_TOKENS = 1 << 24
"""Upper end of `sparse_prefill_from` (longer than any context vLLM serves)."""


@dataclass(frozen=True)
class ZipVL(MiKV):
    info: ClassVar[MethodInfo] = MethodInfo(
        "zipvl", "ZipVL: efficient large vision-language models with dynamic token sparsification", "2410.08584",
        Family.MIXED_PRECISION,
        "layer-adaptive important tokens (attention mass) high-bit, the rest low-bit; sparse prefill",
    )

    pages: Kivi = dataclasses.replace(EVICTION_PAGES, bits=4)
    """The important tokens' pages: 4-bit, the paper's high precision (its low one is 2-bit)."""
    budget: int | float = 0.3
    """The cap: 30% of every prompt at 4 bits, the rest at 2, about 0.19 of bf16's bytes (5x)."""
    tau: float = 0.99
    """Attention-mass share of the important tokens. On SmolLM2 at 2,000 tokens, sparse prefill at
    0.99 found 5 of 10 needles against 6 dense, at 0.95 only 3; at 0.99 its layers ask for 8% to 91%
    of the prompt (docs/mixed_precision.md). The bytes are the cap's either way."""
    sparse_prefill_from: int = 4096
    """Prompts from 4,096 tokens prefill sparsely: below that the context is too short to save."""

    def problems(self) -> list[str]:
        problems = super().problems()
        if not isinstance(self.tau, float) or not 0.0 < self.tau < 1.0:
            problems.append(f"tau={self.tau!r} is not allowed; allowed: a share of the attention mass in (0, 1)")
        check_range("sparse_prefill_from", self.sparse_prefill_from, 0, MAX_PROMPT_TOKENS, problems)
        return problems

    def sparse_prefill(self, prompt_len: int) -> bool:
        """Whether a prompt of `prompt_len` tokens prefills over its important context only."""
        return bool(self.sparse_prefill_from) and prompt_len >= self.sparse_prefill_from

    def prefill_context(self, queries: "torch.Tensor", keys: "torch.Tensor", values: "torch.Tensor",
                        context_len: int, scale: float) -> tuple["torch.Tensor", "torch.Tensor", int]:
        """The context tokens holding `tau` of the chunk's probes' attention, with the sink and the
        recent window (eviction/attention_mass.py `sparse_context`)."""
        from vllm_kvpress.eviction.attention_mass import sparse_context

        return sparse_context(queries, keys, values, context_len, scale, tau=self.tau,
                              num_probes=self.observation_window, sink=self.sink, window=self.window)

    def score(self, stats: "WindowStats") -> "torch.Tensor":
        """Importance: the window queries' attention per KV head, each key's normalized by the
        queries that see it (eviction/attention_mass.py)."""
        from vllm_kvpress.eviction.attention_mass import normalized_attention

        return stats.per_kv_head(normalized_attention(stats.attention_sum, stats.query_positions))

    def choose(self, stats: "WindowStats", free: "torch.Tensor", num_free: int) -> "torch.Tensor":
        """The cap's highest-ranked tokens; records the share the mass threshold asked for."""
        from vllm_kvpress.eviction.attention_mass import ChosenRatios, tokens_for_mass

        scores = self.score(stats)
        num_tokens = scores.shape[1]
        ChosenRatios.record(tokens_for_mass(scores, self.tau) / num_tokens)
        return highest_free(scores, free, num_free)
