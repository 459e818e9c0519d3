"""Owns the reference engine: Hugging Face transformers with our compressed pages inside attention.

Batch size 1, greedy, CPU or GPU. Every attention layer keeps one sequence's K/V in a compressed
page tensor exactly as vLLM's cache holds it (uint8 [num_blocks, num_kv_heads, bytes_per_head],
block i = tokens [i * block_size, (i + 1) * block_size)), written and read with
`reference.page_codec`. What attention sees mirrors the vLLM backend:

- prefill chunk (T > 1 new tokens): the past from pages, its own T tokens as exact fresh K/V;
- decode step (T == 1): everything from pages, including the token just written.

The model runs with a DynamicCache only to hand the attention function this step's K/V; for a
compressed method the exact past it also holds is never read.

Eviction methods (`method.eviction`) evict as the vLLM worker does, once, after the attention
of the chunk that completes the prompt: each layer scores the prompt with that chunk's last
`observation_window` queries (`eviction.scoring.select_kept_tokens`), writes the kept tokens of
every KV head as complete blocks into the sequence's first pages (re-quantized by the page codec)
and moves the tail (the last partial prompt block) right after them, bytes unchanged. Later steps
read kept + tail + decoded tokens; their positions (RoPE) stay the original ones. With decode-time
eviction (`decode_interval`), every step that reaches an eviction point (`policy.freed_end`)
compacts the kept tokens and those since the last eviction the same way, scored by the sequence's
last `decode_observation_window` queries. RazorAttention (`razor`) packs the prompt head-wise
exactly as the worker does (`eviction/headwise.py`): the same kept and middle regions, in the same
view blocks and head slots; each KV head then attends to its own tokens. A method with a sparse
prefill (`zipvl`) has each chunk of a long prompt attend to the part of its context the method
picks (`prefill_context`) and its own tokens.
"""

import torch

from vllm_kvpress.eviction.attention_mass import (
    ChosenRatios,
    extend_by_layer,
    important_share_report,
    mean_share_by_layer,
)
from vllm_kvpress.eviction.compaction import (
    PromptCompaction,
    RecentCompaction,
    gather_kept,
    kept_prompt_tokens,
    kept_recent_kv,
)
from vllm_kvpress.eviction.policy import freed_end, kept_blocks
from vllm_kvpress.eviction.sentences import SentenceIndex, sentence_end_ids, sentence_of_tokens
from vllm_kvpress.layout import PageLayout
from vllm_kvpress.models import head_size
from vllm_kvpress.reference import page_codec
from vllm_kvpress.reference.attention import causal_attention

ATTENTION_NAME = "kvpress_reference"
"""Name under which `compressed_attention_forward` is registered in transformers' AttentionInterface."""
PAGES_KWARG = "kvpress_pages"
"""Forward keyword that carries the per-layer pages down to the attention function."""
GROUPS_KWARG = "kvpress_layer_groups"
"""Forward keyword that carries a cross-layer method's `PromptGroupFactoring`."""
TOKENS_KWARG = "kvpress_token_ids"
"""Forward keyword that carries the forward's token ids, for a method that reads them (sentencekv)."""


class SequencePages:
    """One layer's compressed pages of one sequence, plus the decoded K/V of its complete blocks.

    A complete block is never written again (slots only grow), so its dequantized K/V are decoded
    once and kept; each call decodes only the blocks completed by this write and the partial one.

    With an eviction config and a prompt length, the sequence is compacted after the forward
    whose tokens complete the prompt (`evict_prompt`) and, with decode-time eviction, after every
    forward that reaches an eviction point (`evict_recent`); `num_evicted` tokens are then gone.
    `compact_if_due` does whichever is due.
    """

    def __init__(
        self,
        layout: PageLayout,
        power_iters: int,
        num_kv_heads: int,
        max_tokens: int,
        device: torch.device,
        *,
        eviction=None,
        prompt_len: int | None = None,
        retrieval_index: list[int] | None = None,
        keep_written: bool = False,
        sentences: tuple[torch.Tensor, frozenset[int]] | None = None,
    ):
        """
        Args:
            eviction: the method's `EvictingMethod` (methods/eviction.py), or None for a method that
                keeps every token.
            retrieval_index: razor: this layer's rank of every KV head among its retrieval heads
                (-1: not one).
            prompt_len: prompt tokens of the sequence; None never evicts (e.g. teacher-forced NLL,
                where vLLM would evict only after the last chunk, with every number computed).
            keep_written: also keep the K/V as written (bf16), for a cross-layer method, which
                factors what the model wrote rather than its pages (`written_keys_values`).
            sentences: sentencekv: the sentence of every prompt token and the sentence-end token
                ids (eviction/sentences.py); decode steps then attend to the sentences retrieved.
        """
        self.layout = layout
        self.power_iters = power_iters
        self.eviction = eviction
        self.prompt_len = prompt_len
        self.num_evicted = 0
        self.retrieval_index = retrieval_index
        self.packing = eviction.packing(num_kv_heads) if eviction is not None else None
        """Razor's head-wise packing, or None."""
        self.schedule_packing = (eviction.middle_packing(num_kv_heads, layout.head_size)
                                 if eviction is not None else None)
        """What the blocks after the every-head ones hold, for the schedule (`policy.Packing`)."""
        self.low_layout = eviction.low_page_layout(layout.head_size) if eviction is not None else None
        """MiKV: the layout of the demoted tokens' chunks, or None."""
        self._prefix_blocks = 0
        self._prefix_tokens = 0
        """Once a prompt is split into precisions: the view blocks of its important and low-precision
        regions, and the tokens they hold per KV head (decoded once, at the head of `_complete_k`)."""
        self.headwise: tuple[int, int, int] | None = None
        """Razor, once packed: (K, n, M) of `eviction/headwise.py`."""
        self._head_prefix: list[tuple[torch.Tensor, torch.Tensor]] = []
        """Razor, once packed: each KV head's K, V before the tail (its kept and middle tokens)."""
        num_blocks = -(-max_tokens // layout.block_size)
        self.cache = torch.zeros(
            num_blocks, num_kv_heads, layout.bytes_per_head, dtype=torch.uint8, device=device
        )
        self.num_tokens = 0
        self._num_tokens_before = 0
        """Tokens of the sequence (evicted ones included) before the last append."""
        self._recent_queries: torch.Tensor | None = None
        """The last `decode_observation_window` queries, with decode-time eviction."""
        self._complete_k = torch.empty(0, num_kv_heads, layout.head_size, device=device)
        self._complete_v = torch.empty(0, num_kv_heads, layout.head_size, device=device)
        self.sentences = sentences
        self.sentence_index: SentenceIndex | None = None
        """sentencekv, from the first decode step on: the index of the stored tokens."""
        self._kept_positions: torch.Tensor | None = None
        """Once the prompt is compacted: the prompt position of each kept slot, per KV head."""
        self._written: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep_written else None
        """With `keep_written`: the K/V of every append, as written."""
        self._tail: torch.Tensor | None = None
        """`tail_keys: exact`: the sequence's exact tail, as one request-state slot (made at the first
        append, in the model's dtype)."""

    @property
    def num_complete_blocks(self) -> int:
        return self._prefix_blocks + (self._complete_k.shape[0] - self._prefix_tokens) // self.layout.block_size

    def _read_blocks(self, first_block: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """read_sequence over blocks first_block.. holding `num_tokens` tokens (identity block table)."""
        num_blocks = -(-num_tokens // self.layout.block_size)
        block_ids = torch.arange(first_block, first_block + num_blocks)
        tail_keys = None if self._tail is None else self._tail[0]
        return page_codec.read_sequence(self.cache, block_ids, num_tokens, self.layout, tail_keys)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `key`/`value` [T, num_kv_heads, head_size] after the stored tokens, as vLLM's write
        kernel would, and return the dequantized K, V of the whole sequence,
        fp32 [S, num_kv_heads, head_size]."""
        num_new = key.shape[0]
        seq_len = self.num_tokens + num_new
        if seq_len > self.cache.shape[0] * self.layout.block_size:
            raise ValueError(
                f"sequence of {seq_len} tokens exceeds the {self.cache.shape[0]} pages allocated"
            )
        slots = torch.arange(self.num_tokens, seq_len, device=self.cache.device)
        tail = None
        if self.layout.exact_tail_keys:
            if self._tail is None:
                self._tail = torch.zeros(1, self.cache.shape[1], self.layout.block_size, self.layout.head_size,
                                         dtype=key.dtype, device=key.device)
            tail = (self._tail, torch.zeros(num_new, dtype=torch.long))
        page_codec.write_tokens(self.cache, key, value, slots, self.layout, self.power_iters, tail)
        if self._written is not None:
            self._written.append((key, value))
        self._num_tokens_before = self.num_tokens + self.num_evicted
        self.num_tokens = seq_len
        bs = self.layout.block_size
        done, full = self.num_complete_blocks, seq_len // bs
        if full > done:
            k, v = self._read_blocks(done, (full - done) * bs)
            self._complete_k = torch.cat([self._complete_k, k])
            self._complete_v = torch.cat([self._complete_v, v])
        partial = seq_len - full * bs
        if not partial:
            return self._complete_k, self._complete_v
        k, v = self._read_blocks(full, partial)
        return torch.cat([self._complete_k, k]), torch.cat([self._complete_v, v])

    def _freed_end(self, num_tokens: int) -> int:
        config = self.eviction
        return freed_end(self.prompt_len, num_tokens, config.budget, self.layout.block_size,
                         self.schedule_packing, config.interval_blocks)

    def _new_freed_end(self) -> int | None:
        """End of the freed range if the tokens just appended reach an eviction point (the
        worker's rule: `policy.freed_end` grows), else None."""
        if self.eviction is None or self.prompt_len is None:
            return None
        before, after = (self._freed_end(n) for n in (self._num_tokens_before, self.num_tokens + self.num_evicted))
        return after if after > before else None

    def sparse_prefill_due(self, context_len: int) -> bool:
        """Whether this prompt chunk attends to part of its `context_len` stored tokens only (the
        method's `sparse_prefill`): a chunk of a long enough prompt that has context."""
        return (self.eviction is not None and self.prompt_len is not None and context_len > 0
                and self.num_tokens + self.num_evicted <= self.prompt_len
                and self.eviction.sparse_prefill(self.prompt_len))

    def chunk_keys_values(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context_len: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """What a prefill chunk attends to, from `keys`, `values` [context_len + T, ...] (the stored
        context, then the chunk's fresh K/V): all of it, or with a sparse prefill due, the context
        the method picks (`prefill_context`) and the chunk."""
        if not self.sparse_prefill_due(context_len):
            return keys, values
        k_context, v_context, _ = self.eviction.prefill_context(queries, keys, values, context_len, scale)
        return torch.cat([k_context, keys[context_len:]]), torch.cat([v_context, values[context_len:]])

    def prompt_completed_now(self) -> bool:
        """Whether the tokens just appended complete the sequence's prompt."""
        return self.prompt_len is not None and self._num_tokens_before < self.prompt_len <= self.num_tokens

    def complete_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the complete blocks, dequantized: fp32 [complete tokens, num_kv_heads, head_size]
        (of a sequence that evicts nothing)."""
        return self._complete_k, self._complete_v

    def written_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the complete blocks as the model wrote them, before the pages' quantization: fp32
        [complete tokens, num_kv_heads, head_size] (pages made with `keep_written`)."""
        if self._written is None:
            raise RuntimeError("these pages keep no written K/V (keep_written=False)")
        complete = self._complete_k.shape[0]
        keys, values = (torch.cat(parts)[:complete].float() for parts in zip(*self._written, strict=True))
        return keys, values

    def rewrite_complete(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write `key`, `value` over the first complete blocks (a cross-layer method's reconstruction
        of the prompt), whole blocks of them."""
        self._write_complete(key, value)
        self._complete_k, self._complete_v = self._read_blocks(0, self._complete_k.shape[0])

    def evicts_now(self) -> bool:
        """Whether the tokens just appended complete the prompt of a sequence that compacts."""
        end = self._new_freed_end()
        return end is not None and end == self.prompt_len // self.layout.block_size

    def recent_eviction_due(self) -> bool:
        """Whether the tokens just appended reach a decode-time eviction point."""
        end = self._new_freed_end()
        return end is not None and end > self.prompt_len // self.layout.block_size

    def observe(self, queries: torch.Tensor) -> None:
        """Keep the last `decode_observation_window` of the queries seen (decode-time eviction)."""
        if self.eviction is None or not self.eviction.interval_blocks:
            return
        seen = queries if self._recent_queries is None else torch.cat([self._recent_queries, queries])
        self._recent_queries = seen[-self.eviction.decode_observation_window:]

    def compact_if_due(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> None:
        """After a forward's attention: `observe` its queries, then compact if a point is reached.

        Args:
            queries: [T, num_heads, head_size] the forward's post-RoPE queries.
            keys, values: what `append` returned (the stored tokens, dequantized).
        """
        self.observe(queries)
        if self.recent_eviction_due():
            self.evict_recent(keys, values, scale)
        elif self.evicts_now() and self.packing is not None:
            self.pack_prompt(keys, values)
        elif self.evicts_now() and self.low_layout is not None:
            self.demote_prompt(queries, keys, values, scale)
        elif self.evicts_now():
            self.evict_prompt(queries, keys, values, scale)

    def _rewrite_prefix(self, num_candidates: int, kept_blocks: int, write_prefix) -> None:
        """Compaction's bookkeeping: `write_prefix()` rewrites the first `kept_blocks` blocks from
        the `num_candidates` leading tokens; the stored blocks after the candidates move (bytes
        unchanged) right after them, and the tokens in between are gone."""
        bs = self.layout.block_size
        rest = self.cache[num_candidates // bs : -(-self.num_tokens // bs)].clone()
        write_prefix()
        self.cache[kept_blocks : kept_blocks + rest.shape[0]] = rest
        self.num_evicted += num_candidates - kept_blocks * bs
        self.num_tokens -= num_candidates - kept_blocks * bs

    def _write_complete(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write key/value as the first complete blocks. The worker hands the write kernel bf16 K/V,
        as for fresh tokens; every block is complete, so each is encoded whole (per-channel K) from
        these tokens alone."""
        slots = torch.arange(key.shape[0], device=self.cache.device)
        page_codec.write_tokens(self.cache, key.to(torch.bfloat16), value.to(torch.bfloat16), slots, self.layout,
                                self.power_iters)

    def _keep(self, kept_k: torch.Tensor, kept_v: torch.Tensor, num_candidates: int) -> None:
        """Write the kept tokens as the first blocks and move the stored blocks after the
        candidates (bytes unchanged) right after them."""
        bs = self.layout.block_size
        self._rewrite_prefix(num_candidates, kept_k.shape[0] // bs, lambda: self._write_complete(kept_k, kept_v))
        complete = self.num_tokens // bs * bs
        self._complete_k, self._complete_v = self._read_blocks(0, complete)

    def evict_prompt(
        self, queries: torch.Tensor, k_prompt: torch.Tensor, v_prompt: torch.Tensor, scale: float
    ) -> None:
        """Keep the tokens the method selects and compact them into the first blocks.

        Args:
            queries: [T, num_heads, head_size] post-RoPE queries of the chunk completing the prompt.
            k_prompt, v_prompt: [prompt_len, num_kv_heads, head_size] dequantized from the pages.
        """
        bs, prompt_len = self.layout.block_size, self.prompt_len
        num_keep = self.eviction.kept_prompt_blocks(prompt_len) * bs
        # the chunk ends at the prompt's last token; its queries are the batch's only ones
        compaction = PromptCompaction(row=0, prompt_len=prompt_len, query_start=0,
                                      context_len=prompt_len - queries.shape[0], kept_blocks=num_keep // bs)
        tokens = kept_prompt_tokens(self.eviction, queries, compaction, k_prompt, scale, bs)
        kept_k, kept_v = gather_kept(k_prompt, v_prompt, tokens)
        self._keep(kept_k, kept_v, prompt_len // bs * bs)
        self._kept_positions = tokens

    def retrieved_slots(self, query: torch.Tensor, keys: torch.Tensor, token_id: int) -> list[torch.Tensor] | None:
        """sentencekv, a decode step: index its token (the last of `keys`, the stored K) and its query
        [num_heads, head_size], then the stored slots each KV head attends to, or None for all."""
        sentence_of_position, end_ids = self.sentences
        if self.sentence_index is None:  # the first decode step: index the compacted prompt
            num_prompt_slots = keys.shape[0] - 1
            kept = self._kept_positions  # None where the prompt fit the budget: nothing was evicted
            if kept is None:
                kept = torch.empty(self.cache.shape[1], 0, dtype=torch.int64)
            tail = torch.arange(self.prompt_len - (num_prompt_slots - kept.shape[1]), self.prompt_len)
            positions = torch.cat([kept, tail.expand(kept.shape[0], -1)], dim=1)
            self.sentence_index = SentenceIndex.from_prompt(positions, sentence_of_position, keys[:num_prompt_slots])
        self.sentence_index.step(query, keys, token_id in end_ids)
        eviction = self.eviction
        return self.sentence_index.attended_slots(eviction.sentence_budget(self.prompt_len), eviction.sink,
                                                  eviction.window)

    def demote_prompt(
        self, queries: torch.Tensor, k_prompt: torch.Tensor, v_prompt: torch.Tensor, scale: float
    ) -> None:
        """MiKV: the method's important tokens as complete high-precision blocks first, every other
        full-block prompt token in low-precision chunks packed after them (`mixed_layout.py`), then
        the tail, moved; the blocks after it are freed.

        Args: as `evict_prompt`'s.
        """
        from vllm_kvpress.eviction.compaction import split_prompt_kv
        from vllm_kvpress.eviction.policy import every_head_blocks

        bs, prompt_len, packing = self.layout.block_size, self.prompt_len, self.schedule_packing
        full = prompt_len // bs
        important = every_head_blocks(prompt_len, self.eviction.budget, bs)
        compaction = PromptCompaction(row=0, prompt_len=prompt_len, query_start=0,
                                      context_len=prompt_len - queries.shape[0], kept_blocks=important)
        high_k, high_v, low_k, low_v = split_prompt_kv(self.eviction, queries, compaction, k_prompt, v_prompt,
                                                       scale, bs)
        low_blocks = packing.middle_blocks(full, important)
        low_region = torch.arange(important, important + low_blocks, device=self.cache.device)

        def write_both_precisions():
            self._write_complete(high_k, high_v)
            page_codec.write_low_chunks(self.cache, low_region, low_k.to(torch.bfloat16), low_v.to(torch.bfloat16),
                                        self.low_layout, packing, self.power_iters)

        kept = important + low_blocks
        self._rewrite_prefix(full * bs, kept, write_both_precisions)
        prefix_k, prefix_v = self._read_blocks(0, important * bs)
        stored_k, stored_v = page_codec.read_low_chunks(self.cache, low_region, full - important, self.low_layout,
                                                        packing)
        self._prefix_blocks, self._prefix_tokens = kept, full * bs
        self._complete_k, self._complete_v = torch.cat([prefix_k, stored_k]), torch.cat([prefix_v, stored_v])
        complete = self.num_tokens // bs
        if complete > kept:
            k, v = self._read_blocks(kept, (complete - kept) * bs)
            self._complete_k = torch.cat([self._complete_k, k])
            self._complete_v = torch.cat([self._complete_v, v])

    def pack_prompt(self, k_prompt: torch.Tensor, v_prompt: torch.Tensor) -> None:
        """Razor: rewrite the prompt in the head-wise packed form of the worker
        (`headwise.compact_prompt_headwise`): kept region, then the retrieval heads' middle chunks,
        then the tail; `head_sequences` then gives each KV head its own tokens."""
        from vllm_kvpress.eviction.headwise import kept_region, middle_region
        from vllm_kvpress.eviction.policy import every_head_blocks

        bs = self.layout.block_size
        full = self.prompt_len // bs
        kept = every_head_blocks(self.prompt_len, self.eviction.budget, bs)
        kept_k, kept_v = kept_region(k_prompt[: full * bs], v_prompt[: full * bs], self.retrieval_index, kept, bs,
                                     self.eviction.sink)
        mid_k, mid_v = middle_region(k_prompt[: full * bs], v_prompt[: full * bs], self.retrieval_index, kept, bs)
        self._keep(torch.cat([kept_k, mid_k]), torch.cat([kept_v, mid_v]), full * bs)
        self.headwise = (kept, full - kept, mid_k.shape[0] // bs)
        view = torch.arange(self.cache.shape[0])
        self._head_prefix = [
            page_codec.read_head_sequence(
                self.cache, view, h, index, (kept + self.headwise[2]) * bs, self.layout, kept=kept,
                chunks=self.headwise[1], middle=self.headwise[2], retrieval_heads=self.packing.retrieval_heads,
            )
            for h, index in enumerate(self.retrieval_index)
        ]

    def head_sequences(self, keys: torch.Tensor, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Razor, once packed: each KV head's K, V [tokens, head_size] from the view's tokens
        (what `append` returned): its packed prefix, then the tail every head shares."""
        kept, _, middle = self.headwise
        start = (kept + middle) * self.layout.block_size
        return [(torch.cat([k, keys[start:, h]]), torch.cat([v, values[start:, h]]))
                for h, (k, v) in enumerate(self._head_prefix)]

    def evict_recent(self, k_view: torch.Tensor, v_view: torch.Tensor, scale: float) -> None:
        """Decode-time eviction: keep the method's choice of the kept tokens and those since the
        last eviction, scored by the last queries (`observe`).

        Args:
            k_view, v_view: [num_tokens, num_kv_heads, head_size] every stored token, dequantized.
        """
        config, bs = self.eviction, self.layout.block_size
        seq_len = self.num_tokens + self.num_evicted
        kept = kept_blocks(self.prompt_len, config.budget, bs, None, config.interval_blocks)
        window = config.decode_observation_window
        compaction = RecentCompaction(
            row=0, request_slot=0, seq_len=seq_len, view_len=self.num_tokens,
            num_candidates=self._freed_end(seq_len) * bs - self.num_evicted, kept_blocks=kept,
        )
        positions = torch.arange(seq_len - window, seq_len, device=k_view.device)
        kept_k, kept_v = kept_recent_kv(config, self._recent_queries, positions, compaction, k_view, v_view,
                                        scale, bs)
        self._keep(kept_k, kept_v, compaction.num_candidates)


class PromptGroupFactoring:
    """A cross-layer method on the reference engine (methods/xkv.py): once the prompt's last chunk
    has passed the last layer of a group, the group's prompt K, turned back to before RoPE, and V
    are replaced by the method's reconstruction, and K is turned again. The method is given the K/V
    the model wrote, not their pages (which would be quantized twice), as a kernel working on the
    fresh K/V would."""

    def __init__(self, method, groups: list[range], rotary_embedding):
        """`groups`: the method's `layer_groups`; `rotary_embedding`: the model's (transformers'
        `model.model.rotary_emb`): (x, position_ids) -> cos, sin [1, T, head_size]."""
        self.method = method
        self.last_of_group = {group[-1]: group for group in groups}
        self.layers = {layer for group in groups for layer in group}
        """Every layer of a group: their pages keep what was written (`keep_written`)."""
        self.rotary_embedding = rotary_embedding

    def after_layer(self, layer_idx: int, pages: list[SequencePages]) -> None:
        group = self.last_of_group.get(layer_idx)
        if group is None or not pages[layer_idx].prompt_completed_now():
            return
        keys, values = zip(*(pages[i].written_keys_values() for i in group), strict=True)
        num_tokens = keys[0].shape[0]
        if num_tokens == 0:
            return
        positions = torch.arange(num_tokens, device=keys[0].device)[None]
        cos, sin = self.rotary_embedding(keys[0], positions)
        cos, sin = cos[0, :, None].float(), sin[0, :, None].float()  # [T, 1, head_size]
        keys, values = self.method.factor_group([rotate(k, cos, -sin) for k in keys], list(values))
        for i, key, value in zip(group, keys, values, strict=True):
            pages[i].rewrite_complete(rotate(key, cos, sin), value)


def headwise_attention(q: torch.Tensor, sequences, scale: float) -> torch.Tensor:
    """Queries [T, num_heads, head_size], each KV head's query group over that head's own K/V
    (`sequences`: per KV head, K and V [S_h, head_size]; causal on their last positions)."""
    group = q.shape[1] // len(sequences)
    return torch.cat([
        causal_attention(q[:, h * group : (h + 1) * group], k_h[:, None], v_h[:, None], scale)
        for h, (k_h, v_h) in enumerate(sequences)
    ], dim=1)


def retrieved_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        slots: list[torch.Tensor] | None) -> torch.Tensor:
    """One decode query [1, num_heads, head_size] over the stored K/V [S, num_kv_heads, head_size]:
    all of it, or each KV head's query group over that head's `slots`."""
    if slots is None:
        return causal_attention(q, k, v, scale)
    return headwise_attention(q, [(k[index, h], v[index, h]) for h, index in enumerate(slots)], scale)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of transformers' Llama/Qwen2 (rotate_half: channel m pairs with m + D/2); with -sin, its
    inverse."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def compressed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, num_heads, T, head_size], key/value
    [1, num_kv_heads, S, head_size] (the whole DynamicCache) -> ([1, T, num_heads, head_size], None).

    The mask is not read: batch size 1 without padding is plain causal attention.
    """
    if query.shape[0] != 1:
        raise ValueError(f"the reference engine runs batch size 1, got a batch of {query.shape[0]}")
    pages: list[SequencePages] | None = kwargs.get(PAGES_KWARG)
    num_new, seq_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1)  # [T, num_heads, head_size]
    k_all, v_all = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [S, num_kv_heads, head_size]
    if pages is not None:
        layer = pages[module.layer_idx]
        if layer.num_tokens + layer.num_evicted != seq_len - num_new:
            raise RuntimeError(
                f"layer {module.layer_idx}: pages hold {layer.num_tokens} tokens, the model "
                f"cache {seq_len - num_new} ({layer.num_evicted} evicted); reset the engine state "
                "between sequences"
            )
        # vLLM's model hands bf16 K/V to the page writer
        k_new = k_all[seq_len - num_new :].to(torch.bfloat16)
        v_new = v_all[seq_len - num_new :].to(torch.bfloat16)
        k_stored, v_stored = layer.append(k_new, v_new)
        k_all, v_all = k_stored, v_stored
        past = k_stored.shape[0] - num_new
        if num_new > 1:  # prefill chunk: its own tokens come from the fresh K/V, not from pages
            k_all = torch.cat([k_stored[:past], k_new.float()])
            v_all = torch.cat([v_stored[:past], v_new.float()])
        if layer.headwise is not None:  # razor's packed pages: each KV head over its own tokens
            if num_new > 1:
                raise NotImplementedError("a prompt chunk over razor's packed pages (the reference prefills once)")
            out = headwise_attention(q, layer.head_sequences(k_stored, v_stored), scale)
        elif layer.sentences is not None and num_new == 1:
            out = retrieved_attention(q, k_all, v_all, scale,
                                      layer.retrieved_slots(q[0], k_stored, kwargs[TOKENS_KWARG][-1]))
        else:
            if num_new > 1:
                k_all, v_all = layer.chunk_keys_values(q, k_all, v_all, past, scale)
            out = causal_attention(q, k_all, v_all, scale)
        with ChosenRatios.at_layer(module.layer_idx):
            layer.compact_if_due(q, k_stored, v_stored, scale)  # after this chunk's attention, as the vLLM worker
        if (groups := kwargs.get(GROUPS_KWARG)) is not None:
            groups.after_layer(module.layer_idx, pages)
    else:
        out = causal_attention(q, k_all, v_all, scale)
    return out.to(query.dtype).unsqueeze(0), None


_registered = False


def register_attention() -> None:
    """Make `attn_implementation="kvpress_reference"` known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, compressed_attention_forward)
    _registered = True


def _cpu_model_name() -> str:
    """The CPU's marketing name on Linux, else the architecture."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class ReferenceEngine:
    """Greedy generation and teacher-forced NLL, batch size 1, prompts fed in prefill chunks."""

    name = "reference"

    def __init__(
        self,
        model_path: str,
        method_config,
        *,
        prefill_chunk: int,
        max_model_len: int,
        device: str | None = None,
        dtype: str | None = None,
    ):
        """
        Args:
            method_config: a validated method config (`config.load_method_config`), or None for
                uncompressed attention.
            prefill_chunk: prompt tokens per forward pass; 0 means the whole prompt at once.
            device: "cpu", "cuda", ...; default cuda when available.
            dtype: model dtype; default bfloat16, what vLLM runs (also the faster one on CPUs with
                AVX512-BF16; pass float32 on older CPUs).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        register_attention()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = getattr(torch, dtype or "bfloat16")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                model_path, dtype=torch_dtype, attn_implementation=ATTENTION_NAME
            )
            .to(self.device)
            .eval()
        )
        text_config = self.model.config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_size = head_size(text_config)
        if method_config is not None:
            method_config = method_config.for_engine(exact_tails_available=True)  # no runner to hand slots over
        self.method_config = method_config
        self.layout = method_config.page_layout(self.head_size) if method_config is not None else None
        # the head policy (razor): every layer's retrieval rank of each KV head
        self.retrieval_index = None
        eviction = method_config.eviction if method_config is not None else None
        if eviction is not None and eviction.packing(self.num_kv_heads) is not None:
            heads = eviction.packed_heads(self.model.config.to_dict(), self.num_kv_heads)
            self.retrieval_index = [[layer.index(h) if h in layer else -1 for h in range(self.num_kv_heads)]
                                    for layer in heads]
        self.power_iters = method_config.pages.power_iters if method_config is not None else 1
        groups = method_config.layer_groups(self.num_layers) if method_config is not None else None
        self.layer_groups = (PromptGroupFactoring(method_config, groups, self.model.model.rotary_emb)
                             if groups is not None else None)
        """A cross-layer method's factoring of each group's prompt KV (methods/xkv.py), or None."""
        self.sentence_ends = (sentence_end_ids(self.tokenizer)
                              if eviction is not None and eviction.retrieves_sentences else None)
        """sentencekv: the token ids that end a sentence (eviction/sentences.py), or None."""
        self.important_shares: dict[int | None, list[float]] = {}
        """Per layer, the share of its prompt each generated sequence's selection rule asked for
        (zipvl's attention-mass count, eviction/attention_mass.py `ChosenRatios`)."""
        self.prefill_chunk = prefill_chunk
        self.max_model_len = max_model_len
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.stop_token_ids = set(eos)

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({_cpu_model_name()}, {torch.get_num_threads()} threads)"

    def _new_sequence(self, max_tokens: int, prompt: list[int] | None = None):
        """A fresh DynamicCache and pages; a `prompt` lets an eviction method compact it."""
        from transformers import DynamicCache

        pages = None
        prompt_len = None if prompt is None else len(prompt)
        if self.layout is not None:
            eviction = self.method_config.eviction
            sentences = None
            if self.sentence_ends is not None and prompt is not None:
                sentences = (sentence_of_tokens(prompt, self.sentence_ends), self.sentence_ends)
            pages = [
                SequencePages(
                    self.layout, self.power_iters, self.num_kv_heads, max_tokens, self.device,
                    eviction=eviction, prompt_len=prompt_len,
                    retrieval_index=None if self.retrieval_index is None else self.retrieval_index[i],
                    keep_written=self.layer_groups is not None and i in self.layer_groups.layers,
                    sentences=sentences,
                )
                for i in range(self.num_layers)
            ]
        return DynamicCache(config=self.model.config), pages

    def _forward(
        self, token_ids: list[int], start: int, cache, pages, last_only: bool = False
    ) -> torch.Tensor:
        """Logits [T, vocab] (fp32) of `token_ids` placed at positions start.. of the sequence;
        [1, vocab] of the last position with `last_only` (a 49k-word head over every prompt token
        is slow)."""
        ids = torch.tensor([token_ids], device=self.device)
        positions = torch.arange(start, start + len(token_ids), device=self.device)[None]
        kwargs = {PAGES_KWARG: pages} if pages is not None else {}
        if self.layer_groups is not None:
            kwargs[GROUPS_KWARG] = self.layer_groups
        if self.sentence_ends is not None:
            kwargs[TOKENS_KWARG] = token_ids
        if last_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, **kwargs
        )
        return out.logits[0].float()

    def _chunks(self, num_tokens: int) -> list[tuple[int, int]]:
        step = self.prefill_chunk or num_tokens
        return [(s, min(s + step, num_tokens)) for s in range(0, num_tokens, step)]

    def _check_length(self, num_tokens: int) -> None:
        if num_tokens > self.max_model_len:
            raise ValueError(
                f"a sequence of {num_tokens} tokens exceeds --max-model-len {self.max_model_len}"
            )

    def selection_report(self) -> dict[str, list[float]] | None:
        """The mean over the generated sequences of each layer's important share, or None where
        the method's rule records none."""
        return important_share_report(mean_share_by_layer(self.important_shares))

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: list[int], progress=None) -> list[str]:
        """Greedy completions of token-id prompts (already chat-formatted), one at a time."""
        outputs = []
        ChosenRatios.drain()  # nothing recorded outside a generated sequence counts
        for prompt, limit in zip(prompts, max_tokens, strict=True):
            self._check_length(len(prompt) + limit)
            cache, pages = self._new_sequence(len(prompt) + limit, prompt=prompt)
            for start, end in self._chunks(len(prompt)):
                logits = self._forward(prompt[start:end], start, cache, pages, last_only=True)
            generated: list[int] = []
            position = len(prompt)
            while True:
                token = int(logits[-1].argmax())
                if token in self.stop_token_ids:
                    break
                generated.append(token)
                if len(generated) >= limit:
                    break
                logits = self._forward([token], position, cache, pages)
                position += 1
            outputs.append(self.tokenizer.decode(generated, skip_special_tokens=True))
            extend_by_layer(self.important_shares, ChosenRatios.drain().items())
            if progress is not None:
                progress.update(1)
        return outputs

    @torch.inference_mode()
    def token_nll(self, token_ids: list[int]) -> list[float]:
        """NLL (nats) of token i given tokens < i, for i = 1..N-1, teacher-forced in prefill chunks."""
        self._check_length(len(token_ids))
        # no prompt_len: vLLM would evict after the last chunk, when every NLL is already computed
        cache, pages = self._new_sequence(len(token_ids))
        nll: list[float] = []
        for start, end in self._chunks(len(token_ids)):
            logits = self._forward(token_ids[start:end], start, cache, pages)
            targets = torch.tensor(token_ids[start + 1 : end + 1], device=self.device)
            log_probs = logits[: targets.numel()].log_softmax(-1)
            nll.extend((-log_probs.gather(1, targets[:, None])[:, 0]).tolist())
        return nll

    @torch.inference_mode()
    def decode_nll(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """NLL (nats) of token i given tokens < i, for i = 1..N-1: the first `prompt_len` tokens
        prefilled in chunks as a prompt (an eviction method compacts it after the last chunk), the
        rest fed one token per step as generated tokens are (decode-time eviction applies)."""
        self._check_length(len(token_ids))
        if not 1 <= prompt_len < len(token_ids):
            raise ValueError(f"prompt_len={prompt_len}; allowed: 1 to {len(token_ids) - 1}")
        cache, pages = self._new_sequence(len(token_ids), prompt=token_ids[:prompt_len])
        logits = [self._forward(token_ids[start:end], start, cache, pages)
                  for start, end in self._chunks(prompt_len)]
        logits += [self._forward([token_ids[i]], i, cache, pages) for i in range(prompt_len, len(token_ids) - 1)]
        log_probs = torch.cat(logits)[: len(token_ids) - 1].log_softmax(-1)
        targets = torch.tensor(token_ids[1:], device=self.device)
        return (-log_probs.gather(1, targets[:, None])[:, 0]).tolist()

    def close(self) -> None:
        del self.model
