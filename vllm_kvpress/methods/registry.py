"""Owns the table of KV-compression methods: the names users type, their papers and status."""

from dataclasses import dataclass
from enum import Enum


class Status(str, Enum):
    AVAILABLE = "available"
    PLANNED = "planned"


class Family(str, Enum):
    QUANTIZATION = "quantization"
    ERROR_CORRECTION = "quantization + error correction"
    MIXED_PRECISION = "mixed precision"
    EVICTION = "eviction"
    EVICTION_MERGE = "eviction + merge"
    HEAD_WISE = "head-wise"
    ADAPTIVE = "adaptive, multi-turn"
    RETRIEVAL = "semantic retrieval"
    DRAFT_GUIDED = "draft-guided"
    CROSS_LAYER = "cross-layer"
    OFFLINE_WEIGHTS = "offline weight transform"
    LEARNED = "learned fusion"
    ASYMMETRIC_KV = "asymmetric K/V"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    """What users type after `--kv-compression`."""
    paper: str
    arxiv: str | None
    """arXiv id of the paper, or None where none is known."""
    family: Family
    status: Status
    summary: str
    """One line: what the method does in this system."""


_METHODS = (
    MethodInfo("kivi", "KIVI: tuning-free asymmetric 2-bit KV-cache quantization", "2402.02750",
               Family.QUANTIZATION, Status.AVAILABLE,
               "K per-channel, V per-token asymmetric 2/4/8-bit groups in packed paged blocks"),
    MethodInfo("gear", "GEAR: near-lossless generative inference with KV-cache compression", "2403.05527",
               Family.ERROR_CORRECTION, Status.AVAILABLE,
               "KIVI-style quantization + per-block low-rank residual + sparse outlier slots"),
    MethodInfo("mikv", "No Token Left Behind: mixed-precision KV cache (MiKV)", None,
               Family.MIXED_PRECISION, Status.PLANNED,
               "important tokens kept at high precision, the rest at low precision instead of evicted"),
    MethodInfo("zipvl", "ZipVL: efficient large vision-language models with dynamic token sparsification",
               "2410.08584", Family.MIXED_PRECISION, Status.PLANNED,
               "layer-adaptive important-token ratio; prefill attends to important tokens only"),
    MethodInfo("kvcrush", "KVCrush: KV-cache size reduction using similarity in head-behaviour", "2503.00022",
               Family.EVICTION, Status.AVAILABLE,
               "binary head-behaviour signature per token; keep group representatives"),
    MethodInfo("scissorhands", "Scissorhands: persistence of importance for KV-cache compression", "2305.17118",
               Family.EVICTION, Status.AVAILABLE,
               "keep pivotal tokens (persistent attention) under a fixed budget"),
    MethodInfo("snapkv", "SnapKV: LLM knows what you are looking for before generation", "2404.14469",
               Family.EVICTION, Status.AVAILABLE,
               "baseline: pooled attention of the last prompt queries picks the kept tokens per KV head"),
    MethodInfo("ems", "EMS: adaptive evict-then-merge strategy for head-wise KV-cache compression",
               "2412.08521", Family.EVICTION_MERGE, Status.PLANNED,
               "global-local scores, head-wise evict-then-merge"),
    MethodInfo("razor", "RazorAttention: efficient KV-cache compression through retrieval heads", "2407.15891",
               Family.HEAD_WISE, Status.AVAILABLE,
               "retrieval heads keep every token, the others sink + compensation token + window; packed pages"),
    MethodInfo("loopserve", "LoopServe: adaptive dual-phase LLM inference acceleration for multi-turn dialogues",
               "2507.13681", Family.ADAPTIVE, Status.PLANNED,
               "online prefill sparsification + progressive decode-time compression"),
    MethodInfo("sentencekv", "SentenceKV: sentence-level semantic KV caching", "2504.00970",
               Family.RETRIEVAL, Status.PLANNED,
               "sentence vectors on GPU, token KV offloaded to CPU and fetched by similarity"),
    MethodInfo("speckv", "SpecKV / SpecPC: draft-based approximate inference", "2506.08373",
               Family.DRAFT_GUIDED, Status.PLANNED,
               "a small draft model's attention picks the KV and prompt tokens to keep"),
    MethodInfo("minicache", "MiniCache: KV-cache compression in depth dimension", "2405.14366",
               Family.CROSS_LAYER, Status.PLANNED,
               "merge adjacent layers' KV by direction interpolation, magnitudes kept"),
    MethodInfo("xkv", "xKV: cross-layer SVD for KV-cache compression", "2503.18893",
               Family.CROSS_LAYER, Status.PLANNED,
               "shared SVD subspace across grouped layers"),
    MethodInfo("kv-head-compress", "Effectively compress KV heads for LLM", "2406.07056",
               Family.OFFLINE_WEIGHTS, Status.PLANNED,
               "MHA/GQA to fewer KV heads from a KV-cache SVD (RoPE-aware), an offline checkpoint tool"),
    MethodInfo("x-ecomla", "X-EcoMLA: upcycling pre-trained attention into MLA", "2503.11132",
               Family.OFFLINE_WEIGHTS, Status.PLANNED,
               "attention to MLA latent KV via SVD init + light distillation, an offline tool"),
    MethodInfo("lococo", "LoCoCo: dropping in convolutions for long context compression", "2406.05317",
               Family.LEARNED, Status.PLANNED,
               "fixed-size cache via learned 1-D convolution mixing"),
    MethodInfo("sigma-diffqkv", "Sigma: differential rescaling of query, key and value (DiffQKV)", "2501.13629",
               Family.ASYMMETRIC_KV, Status.PLANNED,
               "differently compressed K and V (bits, heads, dims)"),
    MethodInfo("sub-moe", "Sub-MoE: efficient MoE compression via subspace expert merging", "2506.23266",
               Family.OFFLINE_WEIGHTS, Status.PLANNED,
               "subspace expert merging: an offline tool producing a smaller checkpoint"),
)

METHODS: dict[str, MethodInfo] = {m.name: m for m in _METHODS}


def available_method_names() -> list[str]:
    return [m.name for m in _METHODS if m.status is Status.AVAILABLE]


def format_methods_table() -> str:
    """The methods table as GitHub markdown, as printed by `vllm-kvpress methods`."""
    rows = ["| method | family | status | paper | what it does here |", "|---|---|---|---|---|"]
    for m in _METHODS:
        paper = f"{m.paper} (arXiv {m.arxiv})" if m.arxiv else m.paper
        rows.append(f"| `{m.name}` | {m.family.value} | {m.status.value} | {paper} | {m.summary} |")
    return "\n".join(rows)
