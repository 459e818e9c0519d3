"""Scissorhands: keep the pivotal tokens, those whose importance persists.

Based on Scissorhands (https://arxiv.org/abs/2305.17118): tokens that received more than average
attention in a history window keep receiving it later (persistence of importance), so under a fixed
budget the tokens that were pivotal most often are the ones to keep.

Once per request, on the forward that completes the prompt (`eviction/scoring.py` forces the sink
and the window, `Scissorhands.score` below ranks the rest):

1. The last `observation_window` prompt queries (the history window) attend to every prompt token.
2. Token j is pivotal for query q of head h when softmax(q_h K^T * scale)_j > 1 / (keys visible to q).
3. Per KV head, count over the window queries of its GQA group how often each token is pivotal;
   ties are broken by the summed attention.
4. The top-(budget - sink - window) tokens by count are kept, plus the sink and the window.

How this relates to the paper's decode-time schedule: Scissorhands keeps a KV cache of at most B
tokens during generation; whenever it is full it drops the m tokens that were least often pivotal
over the last w steps, the recent r tokens exempt. Here the first drop runs at the end of prefill,
with the last `observation_window` prompt queries as the history (they are the queries the paper
would have seen had the prompt been generated), `window` as the exempt recent tokens and one drop
of P - budget tokens instead of repeated drops of m. With `decode_interval` > 0 the schedule goes on
during generation: every `decode_interval` tokens the kept tokens and those generated since are
counted again over the last `decode_observation_window` queries and `budget` of them stay (m =
decode_interval, the paper's drop size, in whole blocks so that the blocks go back to vLLM). Counting
"above average" is the complement of the paper's "below average" count for every token the whole
window saw; tokens inside the window are in the kept recent window anyway.

Other deviations: the budget is rounded up to whole blocks and the last partial prompt block stays;
attention sinks (`sink`) are kept explicitly; the kept tokens are re-quantized into `bits`-bit pages.

Parameters (defaults: the fields below; configs/scissorhands.yaml writes them out)
----------
budget, window, sink, observation_window, decode_interval, decode_observation_window, pages : as for
    every eviction method (methods/eviction.py); observation_window is the paper's history window
    at the end of prefill, decode_observation_window during generation.
bits, group_size, block_size, tail_keys : of its pages (KIVI's, methods/kivi.py, unless `pages` names
    another quantizer).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vllm_kvpress.methods.base import Family, MethodInfo
from vllm_kvpress.methods.eviction import TokenEviction

if TYPE_CHECKING:
    import torch

    from vllm_kvpress.eviction.scoring import WindowStats


def score_scissorhands(stats: "WindowStats") -> "torch.Tensor":
    """[num_kv_heads, P]: pivotal counts of each GQA group, ties broken by summed attention. One
    query's attention sums to 1, so the group's window sums to at most group * num_queries; divided
    by that + 1 it stays below 1 and cannot overturn a whole count."""
    counts = stats.per_kv_head(stats.pivotal_count)
    attention = stats.per_kv_head(stats.attention_sum)
    return counts + attention / (stats.group * stats.num_queries + 1.0)


@dataclass(frozen=True)
class Scissorhands(TokenEviction):
    """No settings of its own: the paper's history window, budget and recent window are the shared
    `observation_window`, `budget` and `window`, and its threshold (1 / visible keys) has no knob."""

    info: ClassVar[MethodInfo] = MethodInfo(
        "scissorhands", "Scissorhands: persistence of importance for KV-cache compression", "2305.17118",
        Family.EVICTION, "keep pivotal tokens (persistent attention) under a fixed budget",
    )
    counts_pivotal: ClassVar[bool] = True

    observation_window: int = 64
    """The paper's history window. A pivotal count out of w queries resolves only w levels per head,
    so a longer window than SnapKV's 32 separates tokens better; it equals `window`, so every
    observing query is itself kept."""

    def score(self, stats: "WindowStats") -> "torch.Tensor":
        return score_scissorhands(stats)
