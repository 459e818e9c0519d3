"""Owns the perplexity task: teacher-forced NLL of a long public-domain text, fed in prefill chunks.

The text is The Jargon File 4.4.7 (Debian `jargon-text`, public domain; corpora.py says why and
how it is fetched). Each window of `num_tokens` tokens starts at a fixed offset of the lexicon;
tokens are scored after the first prefill chunk, i.e. only tokens whose context includes K/V read
back from compressed pages (in the first chunk every engine attends to exact K/V).
"""

from dataclasses import dataclass

from vllm_kvpress.eval import corpora

TASK = "ppl"
WINDOW_STARTS = (0.1, 0.5)
"""Where each scored window starts, as a fraction of the corpus: two unrelated stretches of text."""


@dataclass(frozen=True)
class PerplexityWindow:
    corpus: str
    start_fraction: float
    token_ids: tuple[int, ...]
    first_scored: int
    """Index into the per-token NLL list (token i+1 given tokens <= i) of the first scored token."""


def build_windows(
    tokenizer, num_tokens: int, prefill_chunk: int, num_windows: int = 1
) -> list[PerplexityWindow]:
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
        # NLL index j is computed at position j; the first position of chunk 2 is j = prefill_chunk
        first_scored = min(prefill_chunk, num_tokens - 2) if prefill_chunk else 0
        windows.append(PerplexityWindow(name, start_fraction, tuple(ids), first_scored))
    return windows
