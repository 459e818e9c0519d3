"""Owns the fixed benchmark workloads and their deterministic prompts.

A workload is a batch of requests of fixed shape (prompt tokens, output tokens), or, for
multi-turn, conversations whose every turn resends the whole history plus a new user message, so
that prefix caching matters. Prompts are random ordinary token ids (models.py), seeded by the
benchmark seed and the workload name: the same command always sends the same tokens, and two
workloads on one engine never share a prefix by accident.

Workloads that share a model and `max_model_len` run on one engine (one vLLM start, 1-2 minutes
on an H100), which is why the Llama workloads below share 8,704 tokens of context.
"""

import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from vllm_kvpress.bench.models import get_model


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    """Key of `models.BENCH_MODELS`."""
    num_requests: int
    """Requests, or conversations for multi-turn workloads."""
    prompt_len: int
    """Tokens of each request's (first) prompt."""
    output_len: int
    """Tokens generated per request, per turn (`ignore_eos`, so exactly this many)."""
    max_model_len: int
    """vLLM `max_model_len` of the engine this workload runs on."""
    turns: int = 1
    follow_up_len: int = 0
    """Tokens of the user message appended before each turn after the first."""
    description: str = ""

    def __post_init__(self) -> None:
        # The table below is ours; this guards edits of it, not user input.
        if self.turns < 1 or (self.turns > 1) != (self.follow_up_len > 0):
            raise ValueError(f"workload {self.name}: follow_up_len > 0 exactly when turns > 1")
        if self.max_context_len > self.max_model_len:
            raise ValueError(
                f"workload {self.name}: {self.max_context_len} tokens of context exceed "
                f"max_model_len {self.max_model_len}"
            )

    @property
    def max_context_len(self) -> int:
        """Tokens one request (the last turn of a conversation) holds in the KV cache at its end."""
        history = self.prompt_len + (self.turns - 1) * (self.output_len + self.follow_up_len)
        return history + self.output_len

    @property
    def prompt_lens(self) -> list[int]:
        """Prompt length of each turn."""
        return [self.prompt_len + t * (self.output_len + self.follow_up_len) for t in range(self.turns)]

    @property
    def engine_key(self) -> tuple[str, int]:
        """Workloads with equal keys can share one engine."""
        return (self.model, self.max_model_len)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_context_len": self.max_context_len}

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        return cls(**{k: v for k, v in data.items() if k != "max_context_len"})


LLAMA = "llama-3.1-8b"
SHORT_CONTEXT = 8704
"""8,000 + 512 tokens rounded up to a multiple of 256; shared by A, B and multi-turn."""
LONG_CONTEXT = 16640

# fmt: off
_WORKLOADS = (
    Workload("long-prompt", LLAMA, num_requests=64, prompt_len=8000, output_len=512,
             max_model_len=SHORT_CONTEXT,
             description="A: long prompts, prefill-heavy; bf16 KV holds about 52 of the 64 at once"),
    Workload("decode-heavy", LLAMA, num_requests=96, prompt_len=4000, output_len=1500,
             max_model_len=SHORT_CONTEXT,
             description="B: long generations; throughput follows how many sequences decode together"),
    Workload("multi-turn", LLAMA, num_requests=32, prompt_len=4000, output_len=256,
             max_model_len=SHORT_CONTEXT, turns=4, follow_up_len=1000,
             description="32 chats x 4 turns; each turn resends the history (prefix caching)"),
    Workload("long-16k", LLAMA, num_requests=64, prompt_len=16000, output_len=512,
             max_model_len=LONG_CONTEXT,
             description="16k-token prompts; the case token eviction is for"),
    # bf16 holds about 27 of these requests at once, so a workload of 64 saturates at 2.4x bf16
    # whatever a method frees; 192 requests leave room to observe 6x and more
    Workload("long-16k-192", LLAMA, num_requests=192, prompt_len=16000, output_len=512,
             max_model_len=LONG_CONTEXT,
             description="long-16k with 192 requests: room to observe eviction's concurrency gain"),
    *(Workload(f"ctx-{k}k", LLAMA, num_requests=64, prompt_len=k * 1000, output_len=256,
               max_model_len=LONG_CONTEXT,
               description="context-length sweep point (64 requests, 256 output tokens)")
      for k in (2, 4, 8, 16)),
)
# fmt: on

WORKLOADS: dict[str, Workload] = {w.name: w for w in _WORKLOADS}
ALIASES: dict[str, list[str]] = {
    "A": ["long-prompt"],
    "B": ["decode-heavy"],
    "ctx-sweep": ["ctx-2k", "ctx-4k", "ctx-8k", "ctx-16k"],
}


def resolve_workloads(names: str | Iterable[str], model: str | None = None) -> list[Workload]:
    """Workloads for `--workloads A,B` (names or aliases), optionally moved to another `--model`.

    Raises:
        ValueError: an unknown name (the message lists the allowed ones) or a workload whose
            context does not fit the model's `max_position_embeddings`.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    resolved: list[Workload] = []
    for raw in names:
        name = raw.strip()
        if name not in WORKLOADS and name not in ALIASES:
            allowed = ", ".join([*WORKLOADS, *(f"{a} (= {'+'.join(v)})" for a, v in ALIASES.items())])
            raise ValueError(f"--workloads: {name!r} is unknown; allowed: {allowed}")
        for expanded in ALIASES.get(name, [name]):
            workload = WORKLOADS[expanded]
            if model is not None:
                workload = replace(workload, model=get_model(model).name)
            if workload not in resolved:
                resolved.append(workload)
    if not resolved:
        raise ValueError("--workloads is empty; name at least one workload, e.g. --workloads A,B")
    return resolved


def group_by_engine(workloads: Iterable[Workload]) -> dict[tuple[str, int], list[Workload]]:
    """Workloads grouped by the engine they run on, in first-seen order."""
    groups: dict[tuple[str, int], list[Workload]] = {}
    for w in workloads:
        groups.setdefault(w.engine_key, []).append(w)
    return groups


@dataclass(frozen=True)
class WorkloadPrompts:
    first_prompts: list[list[int]]
    """[num_requests][prompt_len] token ids of each request's first (or only) prompt."""
    follow_ups: list[list[list[int]]] = field(default_factory=list)
    """[num_requests][turns - 1][follow_up_len] user tokens appended before each later turn;
    empty for single-turn workloads."""


def _seed_sequence(seed: int, name: str) -> list[int]:
    # crc32, not hash(): Python salts str hashes per process.
    return [seed, zlib.crc32(name.encode())]


def random_token_ids(shape: tuple[int, ...], *, num_ordinary_tokens: int, seed: int, name: str) -> np.ndarray:
    rng = np.random.default_rng(_seed_sequence(seed, name))
    return rng.integers(0, num_ordinary_tokens, size=shape, dtype=np.int64)


def make_prompts(workload: Workload, seed: int) -> WorkloadPrompts:
    """The workload's token ids: a pure function of (workload, seed)."""
    vocab = get_model(workload.model).num_ordinary_tokens
    first = random_token_ids(
        (workload.num_requests, workload.prompt_len), num_ordinary_tokens=vocab, seed=seed, name=workload.name
    )
    follow_ups: list[list[list[int]]] = []
    if workload.turns > 1:
        follow_ups = random_token_ids(
            (workload.num_requests, workload.turns - 1, workload.follow_up_len),
            num_ordinary_tokens=vocab,
            seed=seed,
            name=f"{workload.name}/follow-ups",
        ).tolist()
    return WorkloadPrompts(first_prompts=first.tolist(), follow_ups=follow_ups)


def next_turn_prompt(history: list[int], output_ids: list[int], follow_up: list[int]) -> list[int]:
    """The prompt of the next turn: everything said so far plus the new user message."""
    return [*history, *output_ids, *follow_up]


WARMUP = Workload(
    "warmup",
    LLAMA,
    num_requests=8,
    prompt_len=256,
    output_len=16,
    max_model_len=SHORT_CONTEXT,
    description="run once per engine before measuring, so that Triton JIT compiles and other "
    "first-call costs do not land in the first workload's time",
)


def warmup_for(model: str, max_model_len: int) -> Workload:
    """The unmeasured warm-up batch for an engine of `model` and `max_model_len`: prompts of the
    whole context, so that wherever a prompt is longer than a prefill chunk its later chunks read a
    cached context (a path the workloads take and a short prompt never does; a cold engine compiled
    its kernel inside workload A's first steps, docs/results/step_profile_h200)."""
    return replace(WARMUP, model=model, max_model_len=max_model_len, prompt_len=max_model_len - WARMUP.output_len)
