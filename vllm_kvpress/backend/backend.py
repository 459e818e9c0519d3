"""Owns KVPressBackend: what vLLM asks an attention backend before building anything (no state)."""

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf

from vllm_kvpress.layout import SUPPORTED_HEAD_SIZES

PAGE_ALIGNMENT_TOKENS = 16
"""Block sizes the kernels accept are multiples of this; the method config picks the exact one."""


class KVPressBackend(AttentionBackend):
    """Attention over compressed pages. Registered as `AttentionBackendEnum.CUSTOM`."""

    is_kvpress_backend: ClassVar[bool] = True
    """Marker read by the KV-cache spec patch (backend/spec.py)."""
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        # vLLM maps the layer's backend back to the enum by this name (Attention.__init__).
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        from vllm_kvpress.backend.impl import KVPressImpl

        return KVPressImpl

    @staticmethod
    def get_builder_cls():
        from vllm_kvpress.backend.metadata import KVPressMetadataBuilder

        return KVPressMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(PAGE_ALIGNMENT_TOKENS)]

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype_str: str = "auto"
    ) -> tuple[int, ...]:
        # uint8 [num_blocks, num_kv_heads, bytes_per_head]. The byte count per page is owned by the
        # spec (layout.py); -1 lets the view infer bytes_per_head from it, so the two cannot disagree.
        return (num_blocks, num_kv_heads, -1)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        if include_num_layers_dimension:
            raise NotImplementedError("cross-layer KV layouts are not supported")
        return (0, 1, 2)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability.major >= 8
