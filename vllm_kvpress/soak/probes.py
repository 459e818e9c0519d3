"""Owns the correctness probes: a fixed set of greedy requests whose answers must not change under
load, and the comparison of their rounds.

With a tokenizer (a real checkpoint) the probes are needle-in-essay prompts built exactly as
`vllm-kvpress eval`'s NIAH task builds them (eval/niah.py on the essays of eval/corpora.py), one
per (length, depth); each answer is decoded here and checked for the needle's number. Without
one (bench's config-only architectures, dummy weights) the probes are random token ids of the same
lengths: they check determinism only.

Every probe is sent as token ids, greedy (temperature 0) and with `ignore_eos`, for exactly
`PROBE_MAX_TOKENS` tokens, so every round generates the same count. The answer compared is the
output up to and including the first end-of-text token (when the tokenizer names one): what a
user would read. A round's answers are compared with the "start" round's, which ran alone:

    divergence rate = probes whose answer differs / probes answered in both rounds
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PROBE_MAX_TOKENS = 32
"""A needle's seven digits and the words around them, with room to differ after them."""
DEFAULT_LENGTH_SHARES = (0.125, 0.5, 0.9)
"""Probe prompt lengths, as shares of the context left after the answer."""
DEFAULT_DEPTHS = (10.0, 50.0, 90.0)
MIN_PROBE_LEN = 256
"""Shortest probe prompt: the NIAH instruction and question alone take about 60 tokens."""
REFERENCE_ROUND = "start"
NEEDLE, RANDOM_TOKENS = "needle", "random-tokens"


@dataclass(frozen=True)
class Probe:
    name: str
    prompt_ids: tuple[int, ...]
    expected: str | None = None
    """The needle's number, which a correct answer contains; None for random-token probes."""

    def to_dict(self) -> dict:
        return {"name": self.name, "prompt_len": len(self.prompt_ids), "expected": self.expected}


@dataclass(frozen=True)
class ProbeSet:
    kind: str
    """NEEDLE or RANDOM_TOKENS."""
    probes: tuple[Probe, ...]
    stop_token_ids: tuple[int, ...] = ()
    decode: Callable[[Sequence[int]], str] | None = field(default=None, compare=False)
    """The tokenizer's decode, for needle probes."""

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "max_tokens": PROBE_MAX_TOKENS,
            "stop_token_ids": list(self.stop_token_ids),
            "probes": [p.to_dict() for p in self.probes],
        }


def default_lengths(max_model_len: int) -> list[int]:
    """Probe prompt lengths for a context: `DEFAULT_LENGTH_SHARES` of what the answer leaves."""
    room = max_model_len - PROBE_MAX_TOKENS
    return sorted({min(room, max(MIN_PROBE_LEN, int(share * room))) for share in DEFAULT_LENGTH_SHARES})


def needle_probes(tokenizer, lengths: Sequence[int], depths: Sequence[float], seed: int) -> ProbeSet:
    """One NIAH sample per (length, depth), as `vllm-kvpress eval` builds them."""
    from vllm_kvpress.eval import niah

    samples = niah.build_samples(tokenizer, list(lengths), list(depths), seed)
    eos = tokenizer.eos_token_id
    return ProbeSet(
        kind=NEEDLE,
        probes=tuple(Probe(s.sample_id, tuple(s.prompt_ids), s.answers[0]) for s in samples),
        stop_token_ids=() if eos is None else (int(eos),),
        decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
    )


def random_probes(lengths: Sequence[int], per_length: int, vocab_size: int, seed: int) -> ProbeSet:
    """`per_length` prompts of random token ids at each length (a model without a tokenizer)."""
    probes = []
    for length in lengths:
        for i in range(per_length):
            rng = np.random.default_rng([seed, length, i])
            ids = rng.integers(0, vocab_size, size=length).tolist()
            probes.append(Probe(f"random-len{length}-{i}", tuple(ids)))
    return ProbeSet(kind=RANDOM_TOKENS, probes=tuple(probes))


def answer_ids(output_ids: Sequence[int], stop_token_ids: Sequence[int]) -> list[int]:
    """The output up to and including the first stop token: what a reader of the answer sees."""
    for i, token in enumerate(output_ids):
        if token in stop_token_ids:
            return list(output_ids[: i + 1])
    return list(output_ids)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where two answers differ (the shorter one's end counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_rounds(
    reference: Mapping[str, Sequence[int] | None], other: Mapping[str, Sequence[int] | None]
) -> dict:
    """Answers of one round against the reference round's, per probe name (None: no answer).

    Probes without an answer in either round are listed as not compared, never as agreeing."""
    compared, diverged, not_compared = 0, {}, []
    for name, expected in reference.items():
        answer = other.get(name)
        if expected is None or answer is None:
            not_compared.append(name)
            continue
        compared += 1
        at = first_difference(expected, answer)
        if at is not None:
            diverged[name] = at
    return {
        "compared": compared,
        "diverged": len(diverged),
        "divergence_rate": len(diverged) / compared if compared else None,
        "first_divergent_token": diverged,
        "not_compared": not_compared,
    }
