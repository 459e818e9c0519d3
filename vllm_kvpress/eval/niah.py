"""Owns the needle-in-a-haystack task (gkamradt style) on the Paul Graham essays.

Grid: context length (prompt tokens) x needle depth (percent of the haystack). The needle is
"The special magic number is N." with a random 7-digit N; it goes in at the token position
`depth% * haystack_tokens`, moved back to the end of the preceding sentence (as the original
benchmark does). The question asks for the number; a sample is correct when N appears in the answer.
"""

import random

from vllm_kvpress.eval import corpora
from vllm_kvpress.eval.samples import ChatRenderer, Sample, fit_to_length

TASK = "niah"
NEEDLE = "The special magic number is {number}."
INSTRUCTION = (
    "A special magic number is hidden in the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.\n\n"
)
QUESTION = "\n\nWhat is the special magic number mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number mentioned in the provided text is"
MAX_TOKENS = 16
"""7 digits plus a few words; SmolLM2 and Qwen2.5 tokenize digits one by one."""
SENTENCE_ENDS = (".", "!", "?")
CHARS_PER_TOKEN_BOUND = 8
"""Essay characters taken per requested token: English averages about 4.5, so 8 is ample."""


def magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def insertion_index(tokenizer, haystack_ids: list[int], depth_percent: float) -> int:
    """Token index of the needle: depth% of the haystack, moved back to just after a sentence end."""
    index = int(len(haystack_ids) * depth_percent / 100)
    while 0 < index < len(haystack_ids):
        if tokenizer.decode(haystack_ids[index - 1 : index]).rstrip().endswith(SENTENCE_ENDS):
            break
        index -= 1
    return index


def haystack_token_ids(tokenizer, max_tokens: int) -> list[int]:
    """The first `max_tokens`-ish tokens of the essays, concatenated in file-name order."""
    text = "\n\n".join(corpora.essays())[: max_tokens * CHARS_PER_TOKEN_BOUND]
    return tokenizer.encode(text, add_special_tokens=False)


def render_context(tokenizer, haystack_ids: list[int], needles: list[tuple[float, str]]) -> str:
    """Haystack text with each (depth_percent, sentence) needle inserted at its sentence boundary."""
    cuts = sorted((insertion_index(tokenizer, haystack_ids, depth), needle) for depth, needle in needles)
    pieces, previous = [], 0
    for index, needle in cuts:
        pieces.append(tokenizer.decode(haystack_ids[previous:index]))
        pieces.append(" " + needle + " ")
        previous = index
    pieces.append(tokenizer.decode(haystack_ids[previous:]))
    return "".join(pieces).strip()


def make_sample(
    renderer: ChatRenderer, haystack_ids: list[int], target_tokens: int, depth_percent: float, seed: int
) -> Sample:
    rng = random.Random(f"{seed}-{TASK}-{target_tokens}-{depth_percent}")
    number = magic_number(rng)
    needle = NEEDLE.format(number=number)
    tokenizer = renderer.tokenizer

    def render(num_haystack_tokens: int) -> list[int]:
        context = render_context(tokenizer, haystack_ids[:num_haystack_tokens], [(depth_percent, needle)])
        return renderer.ids([{"role": "user", "content": INSTRUCTION + context + QUESTION}], ANSWER_PREFIX)

    num_haystack_tokens, ids = fit_to_length(render, target_tokens, len(haystack_ids))
    return Sample(
        task=TASK,
        sample_id=f"len{target_tokens}-depth{depth_percent:g}",
        prompt_ids=tuple(ids),
        answers=(number,),
        max_tokens=MAX_TOKENS,
        info={
            "target_tokens": target_tokens,
            "depth_percent": depth_percent,
            "needle": needle,
            "haystack_tokens": num_haystack_tokens,
        },
    )


def build_samples(tokenizer, lengths: list[int], depths: list[float], seed: int) -> list[Sample]:
    """One sample per (length, depth), deterministic in `seed`."""
    renderer = ChatRenderer(tokenizer)
    haystack_ids = haystack_token_ids(tokenizer, max(lengths))
    if len(haystack_ids) < max(lengths):
        raise ValueError(f"the essays hold {len(haystack_ids)} tokens, fewer than --lengths {max(lengths)}")
    return [
        make_sample(renderer, haystack_ids, length, depth, seed) for length in lengths for depth in depths
    ]
