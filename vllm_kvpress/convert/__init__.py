"""Offline checkpoint conversions (`vllm-kvpress convert`): models with a smaller KV cache."""
