"""Owns the multi-turn recall task: later turns ask about facts stated in earlier turns (LoopServe setting).

One prompt is a whole conversation in the model's chat template: `NUM_TURNS` user turns, each
sharing a passage of the Paul Graham essays and asking about it, with a short canned assistant
reply; three of the turns (first, middle, last) also state a fact, "the access code of my blue
locker is 4821937". The final turn asks for one of the three codes. The grid is context length x
which turn stated the asked fact; a sample is correct when the code appears in the answer.

In serving, earlier turns of a chat sit in compressed pages while later turns are prefilled; with
`--prefill-chunk` the final question likewise reads the conversation from pages.

`multiturn-position` (`build_samples` with `positions`) moves the question into a last passage turn, at its
beginning, middle or end: LoopServe's observation that a question is not always the last thing in a
turn, where methods that score the cache from the prompt's last queries (SnapKV) lose it. Its
samples are tasks `multiturn-position/beginning`, `/middle` and `/end`, so each position is scored
on its own.
"""

import random

from vllm_kvpress.eval.niah import haystack_token_ids
from vllm_kvpress.eval.samples import ChatRenderer, Sample, fit_to_length

TASK = "multiturn"
POSITION_TASK = "multiturn-position"
QUESTION_POSITIONS = ("beginning", "middle", "end")
"""Where the question sits in the last passage turn of a `multiturn-position` sample."""
NUM_TURNS = 7
FACT_TURNS = (0, NUM_TURNS // 2, NUM_TURNS - 1)
"""User turns (0-based) that state a fact: first, middle, last."""
FACT_NAMES = ("first", "middle", "last")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "black")
ITEMS = ("locker", "safe", "bicycle lock", "suitcase", "mailbox", "garage", "storage unit", "cabinet")
FACT = "By the way, please remember this: the access code of my {thing} is {code}."
FACT_REPLY = "Got it, I will remember that the access code of your {thing} is {code}. "
PASSAGE_REQUEST = "Here is a passage I am reading:\n\n{passage}\n\nWhat is it about?"
PASSAGE_REPLY = 'The passage begins: "{opening}" It discusses the ideas that follow from there.'
QUESTION = "What is the access code of my {thing}? Answer with the number only."
LAST_PASSAGE = "One more passage from my reading:\n\n{passage}"
ANSWER_PREFIX = "The access code of your {thing} is"
MAX_TOKENS = 16
OPENING_CHARS = 80


def conversation(
    tokenizer, essay_ids: list[int], tokens_per_passage: int, facts: list[tuple[str, str]], asked: int,
    question_at: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages of one sample; facts[i] = (thing, code) is stated in user turn FACT_TURNS[i].
    The question is the last turn on its own, or with `question_at` one of QUESTION_POSITIONS, put
    at that place of a last passage."""
    messages = []
    for turn in range(NUM_TURNS):
        start = turn * tokens_per_passage
        passage = tokenizer.decode(essay_ids[start : start + tokens_per_passage]).strip()
        user, reply = PASSAGE_REQUEST.format(passage=passage), ""
        if turn in FACT_TURNS:
            thing, code = facts[FACT_TURNS.index(turn)]
            user = FACT.format(thing=thing, code=code) + "\n\n" + user
            reply = FACT_REPLY.format(thing=thing, code=code)
        opening = " ".join(passage[:OPENING_CHARS].split())
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": reply + PASSAGE_REPLY.format(opening=opening)},
        ]
    question = QUESTION.format(thing=facts[asked][0])
    if question_at is None:
        messages.append({"role": "user", "content": question})
        return messages
    start = NUM_TURNS * tokens_per_passage
    passage_ids = essay_ids[start : start + tokens_per_passage]
    half = len(passage_ids) // 2
    parts = {
        "beginning": [question, LAST_PASSAGE.format(passage=tokenizer.decode(passage_ids).strip())],
        "middle": [LAST_PASSAGE.format(passage=tokenizer.decode(passage_ids[:half]).strip()), question,
                   tokenizer.decode(passage_ids[half:]).strip()],
        "end": [LAST_PASSAGE.format(passage=tokenizer.decode(passage_ids).strip()), question],
    }[question_at]
    messages.append({"role": "user", "content": "\n\n".join(parts)})
    return messages


def make_sample(
    renderer: ChatRenderer, essay_ids: list[int], target_tokens: int, asked: int, index: int, seed: int,
    question_at: str | None = None,
) -> Sample:
    task = TASK if question_at is None else f"{POSITION_TASK}/{question_at}"
    rng = random.Random(f"{seed}-{task}-{target_tokens}-{asked}-{index}")
    things = [
        f"{c} {i}"
        for c, i in zip(rng.sample(COLORS, len(FACT_TURNS)), rng.sample(ITEMS, len(FACT_TURNS)), strict=True)
    ]
    facts = [(thing, str(rng.randint(1_000_000, 9_999_999))) for thing in things]
    # a different stretch of the essays per sample, always long enough for the whole conversation
    window = essay_ids[rng.randrange(0, max(1, len(essay_ids) - target_tokens)) :]
    thing = facts[asked][0]

    def render(tokens_per_passage: int) -> list[int]:
        return renderer.ids(
            conversation(renderer.tokenizer, window, tokens_per_passage, facts, asked, question_at),
            ANSWER_PREFIX.format(thing=thing),
        )

    num_passages = NUM_TURNS + (question_at is not None)
    tokens_per_passage, ids = fit_to_length(render, target_tokens, target_tokens // num_passages + 1)
    where = "" if question_at is None else f"-{question_at}"
    return Sample(
        task=task,
        sample_id=f"len{target_tokens}-{FACT_NAMES[asked]}{where}-{index}",
        prompt_ids=tuple(ids),
        answers=(facts[asked][1],),
        max_tokens=MAX_TOKENS,
        info={
            "target_tokens": target_tokens,
            "fact_turn": FACT_TURNS[asked],
            "asked": FACT_NAMES[asked],
            "num_turns": NUM_TURNS + 1,
            "question_at": question_at or "own turn",
            "tokens_per_passage": tokens_per_passage,
        },
    )


def build_samples(tokenizer, lengths: list[int], samples_per_length: int, seed: int,
                  positions: tuple[str, ...] | None = None) -> list[Sample]:
    """`samples_per_length` samples per length, cycling over which turn's fact is asked; with
    `positions` (QUESTION_POSITIONS), also over where the question sits in the last passage, every
    len(FACT_TURNS) samples (9 samples: every pair)."""
    renderer = ChatRenderer(tokenizer)
    essay_ids = haystack_token_ids(tokenizer, 2 * max(lengths))
    return [
        make_sample(renderer, essay_ids, length, index % len(FACT_TURNS), index, seed,
                    None if positions is None else positions[index // len(FACT_TURNS) % len(positions)])
        for length in lengths
        for index in range(samples_per_length)
    ]
