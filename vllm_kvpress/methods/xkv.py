"""xKV (arXiv 2503.18893, "Cross-Layer SVD for KV-Cache Compression"): one SVD over the prompt KV
of a group of adjacent layers.

The dominant singular vectors of the KV cache are well aligned across layers, so the prompt's keys
of `group_layers` adjacent layers, side by side as one [T, G * Hkv * D] matrix, share a low-rank
token basis:

    [K_1 | K_2 | ... | K_G]  ~  A [B_1 | B_2 | ... | B_G]     A [T, rank_k], B_l [rank_k, Hkv * D]

A is stored once per token for the whole group (its layers' only per-token keys) and the B_l once
per request; values the same with `rank_v`. As the paper and its code do:
- keys are factored before RoPE (RoPE turns each position by its own angles and spreads the
  spectrum), and turned back after;
- the prompt is factored once, after its prefill; generated tokens stay as they are;
- groups are consecutive layers from the first; the last group takes the layers that remain.

How this version deviates, and why:
- Reference engine only (`Status.REFERENCE_ONLY`): the reconstructed K/V are written back into each
  layer's 8-bit pages (near lossless: docs/eval.md), which measures what the factorization keeps.
  vLLM pages shared across a group's layers (A once per group) and attention through the basis are
  not built, so vLLM refuses the method; the KV bytes reported are those of A and B in bf16, the
  layout xKV stores.
- The prompt's complete blocks are factored; its last partial block stays as written (the tokens a
  later block write would re-encode, as eviction's candidates).

Parameters (defaults: the fields below; `vllm-kvpress methods xkv`)
----------
group_layers : int
    Adjacent layers factored together.
rank_k, rank_v : int or float
    Rank of the group's keys and values: a count, or a share in (0, 1] of the group's width
    G * Hkv * D (rounded up). The defaults are the paper's Llama-3.1-8B setting (groups of 4, ranks
    512 and 768 of 4096 columns), 6.4x fewer bytes than bf16 for a long prompt.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vllm_kvpress.methods.base import CompressionMethod, Family, MethodInfo, Status, check_range
from vllm_kvpress.methods.kivi import Kivi

if TYPE_CHECKING:
    import torch

XKV_PAGES = Kivi(bits=8, group_size="head", tail_keys="staged")
"""The pages the reconstructed K/V are written back into on the reference engine."""
MAX_GROUP_LAYERS = 64


def rank_for(rank: int | float, width: int) -> int:
    """A rank setting (a count, or a share of `width`) as a count, at most `width`."""
    count = math.ceil(rank * width) if isinstance(rank, float) else rank
    return max(1, min(count, width))


@dataclass(frozen=True)
class XKV(CompressionMethod):
    info: ClassVar[MethodInfo] = MethodInfo(
        "xkv", "xKV: cross-layer SVD for KV-cache compression", "2503.18893", Family.CROSS_LAYER,
        "one SVD over the prompt KV of a group of adjacent layers (pre-RoPE keys); shared token basis",
        Status.REFERENCE_ONLY,
    )

    group_layers: int = 4
    """Adjacent layers factored together (the paper's default)."""
    rank_k: int | float = 0.125
    """Keys' rank per group: 1/8 of the group's width (512 of 4096 on Llama-3.1-8B in the paper)."""
    rank_v: int | float = 0.1875
    """Values' rank per group: 3/16 of the width (768 of 4096): values are less low-rank than keys."""

    def problems(self) -> list[str]:
        problems: list[str] = []
        check_range("group_layers", self.group_layers, 1, MAX_GROUP_LAYERS, problems)
        for name in ("rank_k", "rank_v"):
            value = getattr(self, name)
            if isinstance(value, float):
                if not 0.0 < value <= 1.0:
                    problems.append(f"{name}={value!r} is not allowed; allowed: a share of the group's width in "
                                    "(0, 1] or a rank (integer)")
            else:
                check_range(name, value, 1, 1 << 20, problems)
        return problems

    def problems_for_model(self, *, head_size: int, num_kv_heads: int, max_model_len: int) -> list[str]:
        problems = super().problems_for_model(head_size=head_size, num_kv_heads=num_kv_heads,
                                              max_model_len=max_model_len)
        width = self.group_layers * num_kv_heads * head_size
        for name in ("rank_k", "rank_v"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > width:
                problems.append(
                    f"{name}={value} exceeds the group's width {width} (group_layers={self.group_layers} x "
                    f"{num_kv_heads} KV heads x head size {head_size}); allowed: up to {width}"
                )
        return problems

    # -- hooks ---------------------------------------------------------------------------------
    @property
    def pages(self) -> Kivi:
        return XKV_PAGES

    def layer_groups(self, num_layers: int) -> list[range]:
        """The groups of layers whose prompt KV is factored together."""
        return [range(first, min(first + self.group_layers, num_layers))
                for first in range(0, num_layers, self.group_layers)]

    def factor_group(self, keys: list["torch.Tensor"], values: list["torch.Tensor"]
                     ) -> tuple[list["torch.Tensor"], list["torch.Tensor"]]:
        """The group's prompt K (before RoPE) and V, each [T, Hkv, D] per layer, as their rank
        `rank_k` / `rank_v` reconstructions (fp32)."""
        return low_rank_across_layers(keys, self.rank_k), low_rank_across_layers(values, self.rank_v)

    def kv_bytes_vs_bf16(self, prompt_lengths: list[int], num_layers: int, num_kv_heads: int,
                         head_size: int) -> float:
        """Stored bytes of the prompts' KV over bf16's: per group, A [T, rank_k + rank_v] per token
        and B [rank_k + rank_v, width] per request, in bf16."""
        stored = full = 0
        for group in self.layer_groups(num_layers):
            width = len(group) * num_kv_heads * head_size
            ranks = rank_for(self.rank_k, width) + rank_for(self.rank_v, width)
            for tokens in prompt_lengths:
                stored += ranks * (tokens + width)
                full += 2 * width * tokens
        return stored / full if full else 1.0


def low_rank_across_layers(tensors: list["torch.Tensor"], rank: int | float) -> list["torch.Tensor"]:
    """Side by side as one [T, sum of Hkv * D] matrix, its best rank-`rank` approximation (SVD), split
    back per layer: fp32 tensors of the inputs' shapes [T, Hkv, D]."""
    import torch

    shapes = [t.shape for t in tensors]
    joined = torch.cat([t.float().reshape(t.shape[0], -1) for t in tensors], dim=1)
    r = rank_for(rank, joined.shape[1])
    u, s, vh = torch.linalg.svd(joined, full_matrices=False)
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    widths = [shape[1] * shape[2] for shape in shapes]
    return [part.reshape(shape) for part, shape in zip(approx.split(widths, dim=1), shapes, strict=True)]
