"""Owns SentenceKV's sentence index (methods/sentencekv.py): which stored tokens form which sentence,
each sentence's semantic vector, and the tokens a decode step attends to.

Per layer and KV head, after the prompt is compacted:

    m_j = mean of the stored keys of sentence j's kept tokens        (zero where none is kept)

Each decode step, with q̄ the mean query of the sentence being generated (its tokens so far, the
current one included), summed over the KV head's query group:

    sentences in the order of m_j . q̄, highest first; their stored tokens, sentence after sentence,
    fill the budget left after the `sink` first and `recent` last slots, which are always attended.

A generated sentence joins the index when its closing punctuation is processed, with the mean of
its keys. While the current sentence has at most one token, a step attends to every stored token (as
the paper's code does, where the mean query is not yet informative).
"""

from dataclasses import dataclass, field

import torch

SENTENCE_ENDS = (".", "!", "?", "...", "。", "！", "？")
"""Text of a token that closes a sentence (surrounding whitespace aside): the paper's punctuation."""


def sentence_end_ids(tokenizer) -> frozenset[int]:
    """Token ids whose text, stripped of whitespace, is a sentence end (`SENTENCE_ENDS`)."""
    ids = set()
    for token_id in range(len(tokenizer)):
        if tokenizer.decode([token_id]).strip() in SENTENCE_ENDS:
            ids.add(token_id)
    return frozenset(ids)


def sentence_of_tokens(token_ids: list[int], end_ids: frozenset[int]) -> torch.Tensor:
    """int64 [len(token_ids)]: the sentence of each token; a sentence end belongs to the sentence it
    closes, and the text after the last end is a sentence of its own."""
    ends = torch.tensor([token in end_ids for token in token_ids], dtype=torch.int64)
    return torch.cumsum(ends, 0) - ends


@dataclass
class SentenceIndex:
    """One layer's index of a sequence: the sentence of every stored slot per KV head (-1: in the
    sentence being generated) and the sentences' vectors."""

    slot_sentence: torch.Tensor
    """int64 [num_kv_heads, num_slots]."""
    vectors: torch.Tensor
    """fp32 [num_kv_heads, num_sentences, head_size]."""
    current: list[torch.Tensor] = field(default_factory=list)
    """Queries [num_heads, head_size] of the sentence being generated."""

    @classmethod
    def from_prompt(cls, positions: torch.Tensor, sentence_of_position: torch.Tensor, keys: torch.Tensor
                    ) -> "SentenceIndex":
        """`positions` int64 [num_kv_heads, num_slots]: the prompt position each stored slot holds, per
        KV head; `sentence_of_position` [prompt_len] (`sentence_of_tokens`); `keys` [num_slots,
        num_kv_heads, head_size] the stored keys."""
        slot_sentence = sentence_of_position[positions]
        _, num_kv_heads, head_size = keys.shape
        num_sentences = int(sentence_of_position.max()) + 1
        sums = torch.zeros(num_kv_heads, num_sentences, head_size)
        counts = torch.zeros(num_kv_heads, num_sentences)
        per_head = keys.float().transpose(0, 1)  # [num_kv_heads, num_slots, head_size]
        sums.scatter_add_(1, slot_sentence[..., None].expand_as(per_head), per_head)
        counts.scatter_add_(1, slot_sentence, torch.ones_like(slot_sentence, dtype=torch.float32))
        return cls(slot_sentence, sums / counts.clamp_min(1)[..., None])

    def step(self, query: torch.Tensor, keys: torch.Tensor, closes_sentence: bool) -> None:
        """After a decode step's token is stored (the last of `keys` [num_slots, num_kv_heads,
        head_size]): add its query [num_heads, head_size] to the current sentence and, when its
        token ends a sentence, index that sentence."""
        self.current.append(query.float())
        grown = keys.shape[0] - self.slot_sentence.shape[1]
        pending = torch.full((self.slot_sentence.shape[0], grown), -1, dtype=torch.int64)
        self.slot_sentence = torch.cat([self.slot_sentence, pending], dim=1)
        if not closes_sentence:
            return
        length = len(self.current)
        new_id = self.vectors.shape[1]
        self.slot_sentence[:, -length:] = new_id
        mean_key = keys[-length:].float().mean(0)  # [num_kv_heads, head_size]
        self.vectors = torch.cat([self.vectors, mean_key[:, None]], dim=1)
        self.current = []

    def attended_slots(self, budget: int, sink: int, recent: int) -> list[torch.Tensor] | None:
        """Per KV head the stored slots this step attends to (ascending), or None for all of them
        (the current sentence has at most one token, or everything fits the budget)."""
        num_kv_heads, num_slots = self.slot_sentence.shape
        if len(self.current) <= 1 or num_slots <= budget:
            return None
        mean_query = torch.stack(self.current).mean(0)  # [num_heads, head_size]
        group_query = mean_query.reshape(num_kv_heads, -1, mean_query.shape[-1]).sum(1)
        scores = torch.einsum("hsd,hd->hs", self.vectors, group_query)
        rank = torch.empty_like(scores, dtype=torch.int64)
        rank.scatter_(1, scores.argsort(dim=1, descending=True),
                      torch.arange(scores.shape[1]).expand(num_kv_heads, -1).contiguous())
        slots = torch.arange(num_slots)
        forced = (slots < sink) | (slots >= num_slots - recent)
        retrievable = ~forced & (self.slot_sentence >= 0)
        # sentence after sentence in score order, each in position order
        order_key = torch.where(retrievable, rank.gather(1, self.slot_sentence.clamp_min(0)) * num_slots + slots,
                                torch.iinfo(torch.int64).max)
        room = max(0, budget - int(forced.sum()))
        chosen = order_key.argsort(dim=1)[:, :room]
        chosen_valid = retrievable.gather(1, chosen)
        result = []
        for h in range(num_kv_heads):
            picked = chosen[h][chosen_valid[h]]
            result.append(torch.cat([slots[forced], picked]).sort().values)
        return result
