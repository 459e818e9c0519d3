"""vllm-kvpress: compressed and mixed-precision KV-cache pages for vLLM.

Importing this package is cheap: it pulls in neither vLLM nor Triton. The vLLM
plugin entry point is `vllm_kvpress.plugin:register`.
"""

__version__ = "0.1.0"
