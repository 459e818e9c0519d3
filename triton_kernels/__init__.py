"""Triton kernels of vllm-kvpress (installed as `vllm_kvpress.triton_kernels`).

- page_format.py: jit helpers shared by the write and read kernels (pack/unpack, dequantize a block)
- cache_write.py: quantize-pack-scatter of new K/V into compressed pages
- decode_attention.py: split-KV paged decode over compressed pages + the split reduction
- prefill_attention.py: prefill / chunked prefill over the compressed context plus the fresh chunk
"""
