"""SentenceKV (arXiv 2504.00970, "Efficient LLM Inference via Sentence-Level Semantic KV Caching"):
decode attends to the sentences whose meaning matches what is being written.

As the paper and its code (github.com/zzbright1998/SentenceKV) do:
1. **Prefill** keeps `budget` prompt tokens per KV head, chosen as SnapKV chooses them (the last
   `observation_window` queries' attention, max-pooled over `kernel_size`); the paper keeps
   r x tau of them (r = 2 in its RULER runs, tau = 1,024). In the paper they go to CPU memory.
2. **Sentences.** The prompt is cut after every punctuation token ('.', '!', '?', '...');
   each sentence's semantic vector, per layer and KV head, is the mean of the keys of its kept
   tokens (`eviction/sentences.py`).
3. **Decode.** Each step, the mean query of the sentence being generated scores every sentence
   vector (dot product); sentences in score order fill `gpu_budget` tokens per KV head, with the
   `sink` first and `window` most recent stored tokens always attended; the step attends to those
   only. A generated sentence joins the index when its punctuation is processed. While the current
   sentence has at most one token, the step attends to every stored token.

How this version deviates, and why:
- Sentences are scored per KV head with the query summed over its GQA group; the paper's code
  repeats K/V to every query head and selects per query head. One selection per KV head is one
  transfer of that head's tokens, where per-query-head selection would bring up to a group's worth.
- Punctuation is every token whose text, whitespace aside, is a sentence end (' .' as well as '.'),
  from the tokenizer; the paper's code lists the punctuation strings and keeps exact vocabulary
  matches.
- The kept prompt tokens are SnapKV's with the `sink` and `window` forced, which the decode step
  also always attends to (32 and 32, the code's start and recent budgets); SnapKV's own setting
  forces only its observation window.
- Reference engine only (`Status.REFERENCE_ONLY`): the token KV stays in the engine's 8-bit pages and
  each step attends to the slots retrieved; the CPU tier, the copies it needs and vLLM's block
  accounting of a bounded GPU share are not built, so vLLM refuses the method.

Parameters (defaults: the fields below; `vllm-kvpress methods sentencekv`)
----------
budget : int or float
    Prompt tokens kept per KV head after prefill (the tier the sentences are retrieved from): a count
    or a share of the prompt; 2,048 = r x tau of the paper's RULER runs.
gpu_budget : int or float
    Stored tokens per KV head a decode step attends to (the paper's tau): a count or a share of the
    prompt; 1,024.
window, sink, observation_window, kernel_size, pages : as snapkv's; window and sink also the recent
    and first tokens every decode step attends to.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

from vllm_kvpress.methods.base import Family, MethodInfo, Status
from vllm_kvpress.methods.snapkv import SnapKV


@dataclass(frozen=True)
class SentenceKV(SnapKV):
    info: ClassVar[MethodInfo] = MethodInfo(
        "sentencekv", "SentenceKV: sentence-level semantic KV caching", "2504.00970", Family.RETRIEVAL,
        "sentence vectors pick the sentences whose kept KV each decode step attends to",
        Status.REFERENCE_ONLY,
    )

    budget: int | float = 2048
    """Prompt tokens kept after prefill per KV head: r x tau, the paper's RULER setting (2 x 1,024)."""
    gpu_budget: int | float = 1024
    """Stored tokens per KV head each decode step attends to: the paper's tau."""
    window: int = 32
    """Most recent tokens kept and always attended (the code's recent budget)."""
    sink: int = 32
    """First tokens kept and always attended (the code's start budget)."""

    def problems(self) -> list[str]:
        problems = super().problems()
        value = self.gpu_budget
        if isinstance(value, float):
            if not 0.0 < value < 1.0:
                problems.append(f"gpu_budget={value!r} is not allowed; allowed: a share of the prompt in (0, 1) or "
                                "a token count (integer)")
        elif isinstance(value, int) and not isinstance(value, bool):
            always = self.sink + self.window if isinstance(self.sink, int) and isinstance(self.window, int) else 0
            if value <= always:
                problems.append(f"gpu_budget={value} leaves no room for a retrieved sentence after sink={self.sink} "
                                f"and window={self.window}; allowed: more than {always} tokens")
            if isinstance(self.budget, int) and value > self.budget:
                problems.append(f"gpu_budget={value} exceeds budget={self.budget}, the tokens kept to retrieve from; "
                                "allowed: at most budget")
        else:
            problems.append(f"gpu_budget={value!r} is not allowed; allowed: a token count or a share in (0, 1)")
        if self.decode_interval:
            problems.append(f"decode_interval={self.decode_interval} is not allowed for sentencekv: the decode "
                            "steps retrieve from every kept token; allowed: 0")
        return problems

    @property
    def retrieves_sentences(self) -> bool:
        return True

    def sentence_budget(self, prompt_len: int) -> int:
        if isinstance(self.gpu_budget, float):
            return math.ceil(self.gpu_budget * prompt_len)
        return self.gpu_budget
