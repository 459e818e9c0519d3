"""Owns the perplexity tasks: teacher-forced NLL of a long public-domain text.

The text is The Jargon File 4.4.7 (Debian `jargon-text`, public domain; corpora.py says why and
how it is fetched). Each window of `num_tokens` tokens starts at a fixed offset of the lexicon.

- `ppl`: the window fed in prefill chunks; tokens are scored after the first chunk, i.e. only
  tokens whose context includes K/V read back from compressed pages (in the first chunk every
  engine attends to exact K/V). Nothing is evicted: vLLM evicts after a prompt's last chunk.
- `decode-ppl`: the first half of the window is a prompt (prefilled, then evicted as any prompt),
  the second half is fed one token per step, as generated tokens are, and scored. This is the loss
  a long generation sees under eviction, decode-time eviction (`decode_interval`) included.
"""

from dataclasses import dataclass

from vllm_kvpress.eval import corpora

TASK = "ppl"
DECODE_TASK = "decode-ppl"
WINDOW_STARTS = (0.1, 0.5)
"""Where each scored window starts, as a fraction of the corpus: two unrelated stretches of text."""


@dataclass(frozen=True)
class PerplexityWindow:
    corpus: str
    start_fraction: float
    token_ids: tuple[int, ...]
    first_scored: int
    """Index into the per-token NLL list (token i+1 given tokens <= i) of the first scored token."""
    prompt_len: int | None = None
    """`decode-ppl`: tokens prefilled as the prompt; the rest are fed one per step."""


def build_windows(
    tokenizer, num_tokens: int, prefill_chunk: int, num_windows: int = 1, *, decode: bool = False
) -> list[PerplexityWindow]:
    """`ppl` windows, or with `decode` the `decode-ppl` ones: the first half a prompt, scored from
    the second decode step on (the first decoded token is predicted by the prompt's last chunk,
    which still attends to every prompt token)."""
    if not 1 <= num_windows <= len(WINDOW_STARTS):
        raise ValueError(f"num_windows={num_windows}; allowed: 1 to {len(WINDOW_STARTS)}")
    name, text = corpora.perplexity_text()
    windows = []
    chars_needed = num_tokens * 8  # English text has about 4.5 characters per token
    for start_fraction in WINDOW_STARTS[:num_windows]:
        start = int(len(text) * start_fraction)
        start = text.find("\n\n", start) + 2  # begin at a paragraph
        ids = tokenizer.encode(text[start : start + chars_needed], add_special_tokens=False)[:num_tokens]
        if len(ids) < num_tokens:
            raise ValueError(
                f"{name}: only {len(ids)} tokens from offset {start}; use a smaller --ppl-tokens"
            )
        if decode:
            prompt_len = num_tokens // 2
            windows.append(PerplexityWindow(name, start_fraction, tuple(ids), prompt_len, prompt_len))
            continue
        # NLL index j is computed at position j; the first position of chunk 2 is j = prefill_chunk
        first_scored = min(prefill_chunk, num_tokens - 2) if prefill_chunk else 0
        windows.append(PerplexityWindow(name, start_fraction, tuple(ids), first_scored))
    return windows
