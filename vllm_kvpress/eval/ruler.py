"""Owns the RULER synthetic tasks, generated offline (hsiehjackson/RULER scripts/synthetic.yaml).

Tasks and their haystacks (metric: string_match_all, every expected string must appear):
- niah_single_1:   one word-key / 7-digit-number needle in repeated noise sentences;
- niah_multikey_2: one real needle among distractor needles with other word keys (haystack = needles);
- niah_multikey_3: the same with UUID keys and UUID values;
- niah_multivalue: four numbers for one key, hidden in the Paul Graham essays;
- vt:   variable tracking, one chain of 4 hops (VAR A = 12345, VAR B = VAR A, ...) in noise;
- cwe:  the 10 most common words of a numbered word list (common words 30x, others 3x; fewer
        repeats of the common words below about 6000 tokens, see `common_word_frequency`);
- fwe:  the 3 most frequent words of a text drawn from a zeta(alpha=2) law over random words.

Deviations: RULER's word lists come from the `wonderwords` package; ours is derived
deterministically from the essays (frequency ranks 150-3000 of 4-9 letter words, stopwords
dropped), so nothing else is downloaded. Depths of needles are uniform at random, seeded.
"""

import collections
import functools
import random
import re
import string
import uuid

from vllm_kvpress.eval import corpora
from vllm_kvpress.eval.niah import haystack_token_ids, render_context
from vllm_kvpress.eval.samples import ChatRenderer, Sample, fit_to_length

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_INSTRUCTION = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUESTION = "\nWhat is the special magic {kind_one} for {key} mentioned in the provided text?"
NIAH_ANSWER = "The special magic {kind_one} for {key} mentioned in the provided text is"
NIAH_QUESTION_ALL = "\nWhat are all the special magic {kind} for {key} mentioned in the provided text?"
NIAH_ANSWER_ALL = "The special magic {kind} for {key} mentioned in the provided text are"
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = (
    "Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
    "are assigned the value {value}, they are:"
)
CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
CWE_ANSWER = "Answer: The top 10 words that appear most often in the list are:"
FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER = "Answer: According to the coded text above, the three most frequently appeared words are:"

VT_HOPS = 4
CWE_NUM_COMMON, CWE_FREQ_COMMON, CWE_FREQ_UNCOMMON = 10, 30, 3
CWE_TOKENS_PER_ITEM = 5
"""About what "123. word" costs in tokens; only used to size the common words' share."""
CWE_COMMON_SHARE = 0.25
FWE_ALPHA, FWE_WORD_LEN, FWE_VOCAB = 2.0, 6, 1000
NUM_MULTIVALUE = 4
MIN_FILL = 0.9
"""A prompt shorter than this fraction of its target means the haystack ran out (a UUID needle
is about 65 tokens, so multikey_3 at 1000 tokens can fall 6% short by granularity alone)."""
MAX_TOKENS = {
    "niah_single_1": 32,
    "niah_multikey_2": 32,
    "niah_multikey_3": 64,
    "niah_multivalue": 64,
    "vt": 32,
    "cwe": 120,
    "fwe": 50,
}
"""Generation budgets (RULER's tokens_to_generate, rounded)."""
TASKS = tuple(MAX_TOKENS)
_STOPWORDS = frozenset(
    [
        "that",
        "this",
        "with",
        "from",
        "have",
        "were",
        "they",
        "their",
        "there",
        "which",
        "what",
        "when",
        "where",
        "would",
        "could",
        "should",
        "about",
        "after",
        "before",
        "other",
        "than",
        "then",
        "them",
        "these",
        "those",
        "into",
        "over",
        "also",
        "been",
        "more",
        "most",
        "some",
        "such",
        "only",
        "very",
        "just",
        "your",
        "will",
        "shall",
        "each",
        "because",
        "while",
        "being",
        "both",
        "through",
        "during",
        "without",
        "again",
        "further",
        "here",
        "once",
        "under",
        "until",
        "above",
        "below",
        "between",
        "same",
        "itself",
        "myself",
        "yourself",
        "people",
        "thing",
        "things",
        "think",
    ]
)


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Deterministic word list from the essays: ranks 150-3000 of 4-9 letter words, no stopwords."""
    counts = collections.Counter(re.findall(r"\b[a-z]{4,9}\b", "\n".join(corpora.essays()).lower()))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[150:3000]
    return tuple(word for word, _ in ranked if word not in _STOPWORDS)


def common_word_frequency(target_tokens: int) -> int:
    """Repeats of each common word: RULER's 30, lowered for short prompts so that the common words
    fill about a quarter of the list (30 x 10 words alone is about 1500 tokens), never below
    the uncommon words' 3 + 2."""
    items = target_tokens / CWE_TOKENS_PER_ITEM
    return int(min(CWE_FREQ_COMMON, max(CWE_FREQ_UNCOMMON + 2, items * CWE_COMMON_SHARE / CWE_NUM_COMMON)))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _insert_sentences(base: list[str], inserts: list[str], rng: random.Random) -> str:
    """`base` sentences with `inserts` placed in order at seeded random positions."""
    positions = sorted(rng.randint(0, len(base)) for _ in inserts)
    out = list(base)
    for offset, (position, sentence) in enumerate(zip(positions, inserts, strict=True)):
        out.insert(position + offset, sentence)
    return " ".join(out)


class RulerBuilder:
    """Builds one sample of a RULER task at a target prompt length.

    All randomness comes from (seed, task, length, index), so a sample never depends on which
    other samples were built.
    """

    def __init__(self, tokenizer, seed: int):
        self.renderer = ChatRenderer(tokenizer)
        self.seed = seed
        self._essay_ids: list[int] | None = None

    def _rng(self, task: str, target_tokens: int, index: int) -> random.Random:
        return random.Random(f"{self.seed}-ruler-{task}-{target_tokens}-{index}")

    def _fit(
        self, task, target_tokens, index, context_of, question, answer_prefix, answers, max_units, info=None
    ):
        """Fit `context_of(units)` (deterministic) into the prompt template at `target_tokens`."""

        def render(units: int) -> list[int]:
            return self.renderer.ids(
                [{"role": "user", "content": context_of(units) + question}], answer_prefix
            )

        units, ids = fit_to_length(render, target_tokens, max_units)
        if len(ids) < target_tokens * MIN_FILL:
            raise ValueError(
                f"ruler/{task}: its haystack fills only {len(ids)} of {target_tokens} tokens; "
                "use a shorter length"
            )
        return Sample(
            task=f"ruler/{task}",
            sample_id=f"len{target_tokens}-{index}",
            prompt_ids=tuple(ids),
            answers=tuple(answers),
            max_tokens=MAX_TOKENS[task],
            info={"target_tokens": target_tokens, "haystack_units": units, **(info or {})},
        )

    @staticmethod
    def _noise_units(target_tokens: int) -> int:
        return target_tokens  # a noise sentence has more than one token: an upper bound

    def niah_single_1(self, target_tokens: int, index: int) -> Sample:
        rng = self._rng("niah_single_1", target_tokens, index)
        key, value = rng.choice(vocabulary()), _number(rng)
        needle = NIAH_NEEDLE.format(kind="numbers", key=key, value=value)
        depth = rng.random()
        noise = NOISE.split(". ")
        noise = [s if s.endswith(".") else s + "." for s in noise]

        def context(units: int) -> str:
            base = (noise * (units // len(noise) + 1))[:units]
            position = int(len(base) * depth)
            return NIAH_INSTRUCTION.format(kind="numbers") + " ".join(
                base[:position] + [needle] + base[position:]
            )

        return self._fit(
            "niah_single_1",
            target_tokens,
            index,
            context,
            NIAH_QUESTION.format(kind_one="number", key=key),
            NIAH_ANSWER.format(kind_one="number", key=key),
            [value],
            self._noise_units(target_tokens),
            {"depth_fraction": depth},
        )

    def _multikey(self, task: str, target_tokens: int, index: int, uuids: bool) -> Sample:
        rng = self._rng(task, target_tokens, index)
        kind, kind_one = ("uuids", "uuid") if uuids else ("numbers", "number")
        max_needles = target_tokens // 10
        words = vocabulary()
        keys = (
            [_uuid(rng) for _ in range(max_needles + 1)]
            if uuids
            else [
                f"{a}-{b}"
                for a, b in zip(rng.choices(words, k=max_needles + 1), rng.choices(words, k=max_needles + 1))
            ]
        )
        if len(set(keys)) < len(keys):  # word pairs can repeat: keep the first occurrence of each
            keys = list(dict.fromkeys(keys))
        values = [(_uuid(rng) if uuids else _number(rng)) for _ in keys]
        needles = [NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, v in zip(keys, values, strict=True)]
        real = 0
        depth = rng.random()

        def context(units: int) -> str:
            distractors = needles[1 : units + 1]
            position = int(len(distractors) * depth)
            return NIAH_INSTRUCTION.format(kind=kind) + " ".join(
                distractors[:position] + [needles[real]] + distractors[position:]
            )

        return self._fit(
            task,
            target_tokens,
            index,
            context,
            NIAH_QUESTION.format(kind_one=kind_one, key=keys[real]),
            NIAH_ANSWER.format(kind_one=kind_one, key=keys[real]),
            [values[real]],
            len(keys) - 1,
            {"depth_fraction": depth},
        )

    def niah_multikey_2(self, target_tokens: int, index: int) -> Sample:
        return self._multikey("niah_multikey_2", target_tokens, index, uuids=False)

    def niah_multikey_3(self, target_tokens: int, index: int) -> Sample:
        return self._multikey("niah_multikey_3", target_tokens, index, uuids=True)

    def niah_multivalue(self, target_tokens: int, index: int) -> Sample:
        rng = self._rng("niah_multivalue", target_tokens, index)
        tokenizer = self.renderer.tokenizer
        if self._essay_ids is None or len(self._essay_ids) < target_tokens:
            self._essay_ids = haystack_token_ids(tokenizer, target_tokens)
        key = rng.choice(vocabulary())
        values = list(dict.fromkeys(_number(rng) for _ in range(NUM_MULTIVALUE)))
        needles = [(rng.random() * 100, NIAH_NEEDLE.format(kind="numbers", key=key, value=v)) for v in values]

        def context(units: int) -> str:
            return NIAH_INSTRUCTION.format(kind="numbers") + render_context(
                tokenizer, self._essay_ids[:units], needles
            )

        return self._fit(
            "niah_multivalue",
            target_tokens,
            index,
            context,
            NIAH_QUESTION_ALL.format(kind="numbers", key=key),
            NIAH_ANSWER_ALL.format(kind="numbers", key=key),
            values,
            len(self._essay_ids),
        )

    def vt(self, target_tokens: int, index: int) -> Sample:
        rng = self._rng("vt", target_tokens, index)
        names: list[str] = []
        while len(names) < VT_HOPS + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
        ]
        noise = [s if s.endswith(".") else s + "." for s in NOISE.split(". ")]
        placement_seed = rng.random()

        def context(units: int) -> str:
            base = (noise * (units // len(noise) + 1))[:units]
            return VT_INSTRUCTION + _insert_sentences(base, chain, random.Random(placement_seed))

        return self._fit(
            "vt",
            target_tokens,
            index,
            context,
            VT_QUESTION.format(value=value),
            VT_ANSWER.format(count=len(names), value=value),
            names,
            self._noise_units(target_tokens),
        )

    def cwe(self, target_tokens: int, index: int) -> Sample:
        rng = self._rng("cwe", target_tokens, index)
        words = rng.sample(vocabulary(), min(len(vocabulary()), 2000))
        common, uncommon = words[:CWE_NUM_COMMON], words[CWE_NUM_COMMON:]
        order_seed = rng.random()
        freq_common = common_word_frequency(target_tokens)

        def context(units: int) -> str:
            bag = [w for w in common for _ in range(freq_common)]
            bag += [w for w in uncommon[:units] for _ in range(CWE_FREQ_UNCOMMON)]
            random.Random(order_seed).shuffle(bag)
            return CWE_INSTRUCTION + " ".join(f"{i + 1}. {w}" for i, w in enumerate(bag))

        return self._fit(
            "cwe", target_tokens, index, context, CWE_QUESTION, CWE_ANSWER, common, len(uncommon)
        )

    def fwe(self, target_tokens: int, index: int) -> Sample:
        import numpy as np

        rng = self._rng("fwe", target_tokens, index)
        vocab: list[str] = []
        while len(vocab) < FWE_VOCAB:
            word = "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN))
            if word not in vocab:
                vocab.append(word)
        vocab[0] = "..."  # RULER: the most frequent "word" is noise, not an answer
        draws = np.random.default_rng(rng.getrandbits(32)).zipf(FWE_ALPHA, size=target_tokens * 2)
        stream = [vocab[r - 1] for r in draws if r <= len(vocab)]

        def context(units: int) -> str:
            return FWE_INSTRUCTION + " ".join(stream[:units])

        units_probe = fit_to_length(
            lambda u: self.renderer.ids([{"role": "user", "content": context(u) + FWE_QUESTION}], FWE_ANSWER),
            target_tokens,
            len(stream),
        )[0]
        counts = collections.Counter(w for w in stream[:units_probe] if w != "...")
        answers = [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:3]]
        return self._fit("fwe", target_tokens, index, context, FWE_QUESTION, FWE_ANSWER, answers, len(stream))


def build_samples(
    tokenizer, tasks: list[str], lengths: list[int], samples_per_length: int, seed: int
) -> list[Sample]:
    """`samples_per_length` samples of each RULER task at each length, deterministic in `seed`."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--ruler-tasks {','.join(unknown)} unknown; allowed: {', '.join(TASKS)}")
    builder = RulerBuilder(tokenizer, seed)
    return [
        getattr(builder, task)(length, index)
        for task in tasks
        for length in lengths
        for index in range(samples_per_length)
    ]
