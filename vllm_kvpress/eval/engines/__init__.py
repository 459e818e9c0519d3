"""Owns the engine interface of the harness and the choice between its two engines.

An engine answers token-id prompts greedily and scores token ids:

    generate(prompts: list[list[int]], max_tokens: list[int], progress=None) -> list[str]
    token_nll(token_ids: list[int]) -> list[float]   # NLL of token i given < i, i = 1..N-1
    selection_report() -> dict | None                 # what the method chose, where the engine sees it
    tokenizer, device_name, close()

`reference` (transformers + reference/page_codec, CPU or GPU) is the oracle of `vllm` (GPU); both
prefill prompts in `prefill_chunk`-token chunks so the same tokens read K/V from pages.
"""

from typing import Protocol

ENGINES = ("reference", "vllm")


class Engine(Protocol):
    name: str
    tokenizer: object
    device_name: str

    def generate(self, prompts: list[list[int]], max_tokens: list[int], progress=None) -> list[str]: ...

    def token_nll(self, token_ids: list[int]) -> list[float]: ...

    def selection_report(self) -> dict | None: ...

    def close(self) -> None: ...


def make_engine(
    engine: str,
    model_path: str,
    method_config,
    *,
    prefill_chunk: int,
    max_model_len: int,
    kv_cache_dtype: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    gpu_memory_utilization: float = 0.85,
    enforce_eager: bool = False,
) -> Engine:
    """Build engine `engine` for one method config (None = uncompressed)."""
    if engine == "reference":
        if kv_cache_dtype != "auto":
            raise ValueError(
                f"--kv-cache-dtype {kv_cache_dtype} is a vLLM baseline; allowed with --engine reference: auto"
            )
        from vllm_kvpress.eval.engines.reference import ReferenceEngine

        return ReferenceEngine(
            model_path,
            method_config,
            prefill_chunk=prefill_chunk,
            max_model_len=max_model_len,
            device=device,
            dtype=dtype,
        )
    if engine == "vllm":
        from vllm_kvpress.eval.engines.vllm_engine import VllmEngine

        return VllmEngine(
            model_path,
            method_config,
            prefill_chunk=prefill_chunk,
            max_model_len=max_model_len,
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
        )
    raise ValueError(f"--engine {engine!r} is unknown; allowed: {', '.join(ENGINES)}")
