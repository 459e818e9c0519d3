"""MiniCache (arXiv 2405.14366, "KV Cache Compression in Depth Dimension for Large Language Models"):
adjacent layers from the middle of the model down share one direction per token.

In the middle-to-deep layers a token's K (and V) vectors of two adjacent layers point almost the same
way. Each vector is split into its magnitude and its direction; a pair of layers stores the two
magnitudes and one direction, the spherical interpolation (SLERP) of the two at `t`:

    e = sin((1 - t) W) / sin W * x_a / |x_a|  +  sin(t W) / sin W * x_b / |x_b|,   W = angle(x_a, x_b)
    x_a ~ |x_a| e,   x_b ~ |x_b| e

The rows (one token and KV head of K, or of V) whose two vectors are furthest apart in angle are
retained unmerged: both layers' own vectors are stored for them, as the paper's token retention.
Pairs are layers (s, s + 1), (s + 2, s + 3), ... from `start_layer` (the middle by default); a last
odd layer and the layers before `start_layer` keep their own KV. K and V are merged separately.
The pages are 4-bit KIVI pages (`bits`): MiniCache is orthogonal to quantization, and its headline
compression (5.02x) is with 4-bit pages.

How this version deviates, and why:
- Retention takes a share of the pair's rows (`retain`, the most distant in angle), where the paper
  retains the rows whose normalized angle exceeds d_min + (d_max - d_min) * gamma: a share gives a
  byte count that depends on the prompt length only, which paged memory has to know before it
  sees the angles (the same reason zipvl's high-precision tokens follow a cap).
- Reference engine only (`Status.REFERENCE_ONLY`): each layer's pages are rewritten with its
  reconstruction (|x| e, or the retained vector), which measures what the merge keeps, quantized at
  `bits` as the stored direction and retained vectors would be. Pages shared by a pair's layers in
  vLLM are not built, so vLLM refuses the method; the bytes reported are those MiniCache stores
  (`kv_bytes_vs_bf16`).
- The prompt's complete blocks are merged once, after its prefill, from the K/V the model wrote
  (not from their pages, which would quantize twice); generated tokens are not merged.
- Keys are merged before RoPE (the reference engine's cross-layer hook turns them back). Both
  layers of a pair see the same rotation at a position, which keeps lengths and angles, so the
  merge is the same as on the rotated keys.

Parameters (defaults: the fields below; `vllm-kvpress methods minicache`)
----------
start_layer : int or float
    The first merged layer: an index, or a share in [0, 1) of the model's depth (0.5: the middle,
    the paper's choice).
t : float
    SLERP's interpolation weight of the deeper layer of a pair, in [0, 1]; 0.6 as the paper.
retain : float
    Share of each pair's rows kept unmerged, in [0, 1); 0.05.
bits : int
    Code width of the pages (KIVI's, per-channel keys, per-token values): 4 or 8.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.methods.base import CompressionMethod, Family, MethodInfo, Status, check_choice
from vllm_kvpress.methods.kivi import Kivi

if TYPE_CHECKING:
    import torch

ALLOWED_PAGE_BITS = (4, 8)
MAGNITUDE_BYTES = 2
"""A magnitude |x| per layer, row and K or V, stored in fp16."""
INDEX_BYTES = 4
"""The position (token and head) of a retained row: an int32."""
PARALLEL_EPS = 1e-6
"""Below this sine of the angle the two directions are parallel: SLERP's weights become linear."""


def is_number(value) -> bool:
    """An int or a float, not a bool (JSON settings arrive as either)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def retained_rows(retain: float, rows: int) -> int:
    """How many of a pair's `rows` (tokens x KV heads) are kept unmerged: the share, rounded up."""
    return min(rows, math.ceil(retain * rows))


@dataclass(frozen=True)
class MiniCache(CompressionMethod):
    info: ClassVar[MethodInfo] = MethodInfo(
        "minicache", "MiniCache: KV-cache compression in depth dimension", "2405.14366", Family.CROSS_LAYER,
        "merge adjacent layers' KV by direction interpolation, magnitudes kept, distinct tokens retained",
        Status.REFERENCE_ONLY,
    )

    start_layer: int | float = 0.5
    """First merged layer: an index, or a share of the depth (the middle, as the paper)."""
    t: float = 0.6
    """SLERP weight of the deeper layer of a pair (the paper's 0.6)."""
    retain: float = 0.05
    """Share of a pair's rows (token x KV head) kept unmerged: the most distant in angle."""
    bits: int = 4
    """Code width of the pages: MiniCache's 5x is on 4-bit pages."""

    def problems(self) -> list[str]:
        problems: list[str] = []
        check_choice("bits", self.bits, ALLOWED_PAGE_BITS, problems)
        if not (is_number(self.t) and 0.0 <= self.t <= 1.0):
            problems.append(f"t={self.t!r} is not allowed; allowed: a SLERP weight in [0, 1]")
        if not (is_number(self.retain) and 0.0 <= self.retain < 1.0):
            problems.append(f"retain={self.retain!r} is not allowed; allowed: a share of the rows in [0, 1)")
        start = self.start_layer
        if not (isinstance(start, float) and 0.0 <= start < 1.0 or is_number(start) and isinstance(start, int)
                and start >= 0):
            problems.append(f"start_layer={start!r} is not allowed; allowed: a layer index >= 0 or a share of the "
                            "depth in [0, 1)")
        return problems

    # -- hooks ---------------------------------------------------------------------------------
    @property
    def pages(self) -> Kivi:
        return Kivi(bits=self.bits, group_size="head", tail_keys="staged")

    def first_merged_layer(self, num_layers: int) -> int:
        """`start_layer` as an index of a model of `num_layers` layers.

        Raises:
            KVCompressionConfigError: no pair of layers starts there.
        """
        first = (int(self.start_layer * num_layers) if isinstance(self.start_layer, float)
                 else self.start_layer)
        if first > num_layers - 2:
            raise KVCompressionConfigError(
                f"start_layer={self.start_layer!r} leaves no pair of layers to merge in a model of {num_layers} "
                f"layers; allowed: an index up to {num_layers - 2} or a share of the depth below "
                f"{(num_layers - 1) / num_layers:.2f}"
            )
        return first

    def layer_groups(self, num_layers: int) -> list[range]:
        """The pairs of adjacent layers merged, from `start_layer` on."""
        first = self.first_merged_layer(num_layers)
        return [range(a, a + 2) for a in range(first, num_layers - 1, 2)]

    def factor_group(self, keys: list["torch.Tensor"], values: list["torch.Tensor"]
                     ) -> tuple[list["torch.Tensor"], list["torch.Tensor"]]:
        """A pair's prompt K (before RoPE) and V, each [T, Hkv, D] per layer, as MiniCache stores
        them: |x| times the shared direction, or the row itself where it is retained (fp32)."""
        return (list(slerp_merge(*keys, t=self.t, retain=self.retain)),
                list(slerp_merge(*values, t=self.t, retain=self.retain)))

    def kv_bytes_vs_bf16(self, prompt_lengths: list[int], num_layers: int, num_kv_heads: int,
                         head_size: int) -> float:
        """Stored bytes of the prompts' KV over bf16's. Per token and KV head, a layer alone stores a
        page's K and V; a merged pair one page's worth for the directions, two fp16 magnitudes of K
        and of V, and for each retained row both layers' vectors in pages and its index."""
        layout = self.pages.page_layout(head_size)
        page = layout.bytes_per_token_head  # K and V of one token and head
        bf16 = 2 * head_size * 2
        pairs = len(self.layer_groups(num_layers))
        alone = num_layers - 2 * pairs
        stored = full = 0
        for tokens in prompt_lengths:
            rows = tokens * num_kv_heads
            kept = retained_rows(self.retain, rows)  # of K, and as many of V
            pair = rows * (page + 2 * 2 * MAGNITUDE_BYTES) + 2 * kept * (page + INDEX_BYTES)
            stored += alone * rows * page + pairs * pair
            full += num_layers * rows * bf16
        return stored / full if full else 1.0


def slerp_merge(first: "torch.Tensor", second: "torch.Tensor", *, t: float, retain: float
                ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Two layers' [T, Hkv, D] vectors -> their MiniCache reconstructions (fp32, same shapes): each
    row's magnitude times the SLERP of the two directions at `t` (toward `second`), except the
    `retain` share of rows furthest apart in angle, which stay as they are."""
    import torch

    shape = first.shape
    a, b = first.float().reshape(-1, shape[-1]), second.float().reshape(-1, shape[-1])
    norm_a, norm_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    unit_a, unit_b = a / norm_a.clamp_min(1e-12), b / norm_b.clamp_min(1e-12)
    angle = torch.acos((unit_a * unit_b).sum(dim=1, keepdim=True).clamp(-1.0, 1.0))
    sine = torch.sin(angle)
    parallel = sine < PARALLEL_EPS
    weight_a = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * angle) / sine.clamp_min(PARALLEL_EPS))
    weight_b = torch.where(parallel, t, torch.sin(t * angle) / sine.clamp_min(PARALLEL_EPS))
    direction = weight_a * unit_a + weight_b * unit_b
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
    merged_a, merged_b = norm_a * direction, norm_b * direction
    kept = retained_rows(retain, a.shape[0])
    if kept:
        rows = torch.topk(angle[:, 0], kept).indices
        merged_a[rows], merged_b[rows] = a[rows], b[rows]
    return merged_a.reshape(shape), merged_b.reshape(shape)
