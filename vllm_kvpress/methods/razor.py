"""RazorAttention: retrieval heads keep every prompt token, the other heads a sink, a compensation
token and a recent window.

Based on RazorAttention (https://arxiv.org/abs/2407.15891): few heads ("retrieval heads", the
induction and echo heads) read far context; the others attend locally, and the tokens they drop
are summarised in one compensation token, the mean of their keys and of their values.

Once per request, on the forward that completes its prompt (`eviction/headwise.py`):

1. Every KV head keeps the request's first K blocks, K = ceil((sink + 1 + window) / block_size).
   A retrieval head keeps its own first K blocks of tokens there; any other head its `sink` first
   tokens, the compensation token of the tokens it drops, and the most recent tokens that fill K.
2. The retrieval heads' remaining full prompt blocks are packed into the head slots of M more
   blocks, M = ceil(n * R / H) for n such blocks, R retrieval heads of H per layer.
3. Blocks [K + M, P // block_size) go back to vLLM; the last partial prompt block and the
   generated tokens are kept by every head.

Deviations from the paper: heads are chosen per KV head (pages are per KV head; a KV head
retrieves when any of its query heads does), and every layer keeps the same number R of them,
the highest-scoring (one block table serves all layers); the scores come from
`vllm-kvpress retrieval-heads` (configs/razor/, one file per model); the kept tokens are
re-quantized into `bits`-bit pages.

Parameters (defaults: the fields below; configs/razor.yaml writes them out)
----------
window : int
    Most recent prompt tokens the other heads keep (rounded up to fill whole blocks).
sink : int
    First prompt tokens the other heads keep.
retrieval_heads : int or "auto"
    KV heads per layer that keep everything; "auto" is about 15% of them, at least one.
head_choice : "scores" or "first"
    "scores": each layer's highest-scoring heads from the model's file in configs/razor/;
    "first": heads 0..R-1 of every layer, for speed measurements on dummy weights only.
pages, bits, group_size, block_size, tail_keys : the pages of every evicting method
    (methods/eviction.py): KIVI 8-bit by default.
"""

from dataclasses import dataclass
from typing import ClassVar

from vllm_kvpress.eviction.policy import HeadPacking
from vllm_kvpress.methods.base import Family, MethodInfo, check_choice, check_range
from vllm_kvpress.methods.eviction import EvictingMethod
from vllm_kvpress.methods.retrieval_heads import default_heads_per_layer, retrieval_heads

HEAD_CHOICES = ("scores", "first")


@dataclass(frozen=True)
class Razor(EvictingMethod):
    info: ClassVar[MethodInfo] = MethodInfo(
        "razor", "RazorAttention: efficient KV-cache compression through retrieval heads", "2407.15891",
        Family.HEAD_WISE,
        "retrieval heads keep every token, the others sink + compensation token + window; packed pages",
    )
    supports_tensor_parallel: ClassVar[bool] = False

    window: int = 1024
    """Most recent prompt tokens the non-retrieval heads keep. The paper keeps a local window of a
    few thousand tokens at 128k context; 1024 is one sixteenth of a 16k prompt."""
    sink: int = 4
    """First prompt tokens the non-retrieval heads keep: StreamingLLM's sinks."""
    retrieval_heads: int | str = "auto"
    """KV heads per layer that keep every token, or "auto": about 15% of them (the paper: 15% of the
    query heads), at least one."""
    head_choice: str = "scores"
    """How the retrieval heads are picked: "scores" (configs/razor/) or "first" (dummy weights)."""

    @property
    def budget(self) -> int:
        """Tokens every KV head keeps: sink, the compensation token, window."""
        return self.sink + 1 + self.window

    def problems(self) -> list[str]:
        problems = super().problems()
        check_range("window", self.window, 1, 1 << 20, problems)
        check_range("sink", self.sink, 0, 1 << 20, problems)
        if self.retrieval_heads != "auto":
            check_range("retrieval_heads", self.retrieval_heads, 0, 1024, problems)
        check_choice("head_choice", self.head_choice, HEAD_CHOICES, problems)
        return problems

    def problems_for_model(self, *, head_size: int, num_kv_heads: int, max_model_len: int) -> list[str]:
        problems = super().problems_for_model(
            head_size=head_size, num_kv_heads=num_kv_heads, max_model_len=max_model_len
        )
        if isinstance(self.retrieval_heads, int) and self.retrieval_heads > num_kv_heads:
            problems.append(
                f"retrieval_heads={self.retrieval_heads} exceeds the model's {num_kv_heads} KV heads per "
                f"layer; allowed: 0 to {num_kv_heads}, or auto"
            )
        return problems

    def heads_per_layer(self, num_kv_heads: int) -> int:
        """R: retrieval KV heads in every layer."""
        if self.retrieval_heads == "auto":
            return default_heads_per_layer(num_kv_heads)
        return self.retrieval_heads

    def packing(self, num_kv_heads: int) -> HeadPacking:
        return HeadPacking(self.heads_per_layer(num_kv_heads), num_kv_heads)

    def packed_heads(self, model_config: dict, num_kv_heads: int) -> list[list[int]]:
        """By `head_choice`, each layer's highest-scoring R KV heads from the model's file in
        configs/razor/, or heads 0..R-1."""
        return retrieval_heads(model_config, self.head_choice, self.heads_per_layer(num_kv_heads))

    def kept_prompt_blocks(self, prompt_len, num_kv_heads: int | None = None, head_size: int | None = None):
        """Leading view blocks kept after compaction: K + M (`eviction/policy.py`); M depends on
        the KV heads per layer, so they must be given."""
        if num_kv_heads is None:
            raise ValueError("razor's kept blocks depend on the KV heads per layer: pass num_kv_heads")
        return super().kept_prompt_blocks(prompt_len, num_kv_heads, head_size)
