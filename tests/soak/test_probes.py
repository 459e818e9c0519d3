"""The probes: needle prompts as `vllm-kvpress eval` builds them (with the model's tokenizer), random
ones for a model without a tokenizer, and their default lengths."""

from vllm_kvpress.eval import niah
from vllm_kvpress.soak.probes import (
    MIN_PROBE_LEN,
    NEEDLE,
    PROBE_MAX_TOKENS,
    RANDOM_TOKENS,
    default_lengths,
    needle_probes,
    random_probes,
)


def test_default_lengths_leave_room_for_the_answer():
    assert default_lengths(8192) == [1020, 4080, 7344]
    assert max(default_lengths(300)) <= 300 - PROBE_MAX_TOKENS and min(default_lengths(300)) == 268 - 12
    for context in (300, 4096, 131072):
        assert all(length + PROBE_MAX_TOKENS <= context for length in default_lengths(context))
    assert min(default_lengths(131072)) >= MIN_PROBE_LEN


def test_random_probes_are_seeded_and_sized():
    probes = random_probes([64, 128], per_length=3, vocab_size=1000, seed=0)
    assert probes.kind == RANDOM_TOKENS and [len(p.prompt_ids) for p in probes.probes] == [64] * 3 + [128] * 3
    assert probes == random_probes([64, 128], per_length=3, vocab_size=1000, seed=0)
    assert probes != random_probes([64, 128], per_length=3, vocab_size=1000, seed=1)
    assert len({p.prompt_ids for p in probes.probes}) == 6 and all(p.expected is None for p in probes.probes)


def test_needle_probes_are_the_eval_tasks_samples(tokenizer):
    probes = needle_probes(tokenizer, [600, 1200], [10.0, 90.0], seed=0)
    samples = niah.build_samples(tokenizer, [600, 1200], [10.0, 90.0], seed=0)
    assert probes.kind == NEEDLE
    assert [p.prompt_ids for p in probes.probes] == [s.prompt_ids for s in samples]
    assert [p.expected for p in probes.probes] == [s.answers[0] for s in samples]
    assert probes.stop_token_ids == (tokenizer.eos_token_id,)
    first = probes.probes[0]
    assert probes.decode(tokenizer.encode(f"It is {first.expected}.", add_special_tokens=False)).endswith(
        f"{first.expected}."
    )
