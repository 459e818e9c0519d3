"""Owns the vLLM engine of the harness: `vllm.LLM` (0.26.0) with our plugin, or a vLLM KV dtype baseline.

GPU only. Greedy generation batches every prompt into one `LLM.generate` call; NLL uses
`prompt_logprobs` on token-id prompts, one window per call so that each is prefilled in whole
`prefill_chunk`-token chunks, like the reference engine.

Settings chosen to mirror the reference engine:
- `enable_chunked_prefill` with `max_num_batched_tokens = prefill_chunk`: a prompt is prefilled in
  chunks whose queries read earlier chunks from (compressed) pages. When several prompts share a
  step the scheduler may cut a prompt's chunk shorter; results then differ from the reference by
  where chunk boundaries fall, not by what a chunk reads.
- prefix caching off: a cached prefix would skip the fresh-K/V prefill of the shared chat header.
"""

import gc

from vllm_kvpress.config import ADDITIONAL_CONFIG_KEY
from vllm_kvpress.eval.engines.worker_extension import WORKER_EXTENSION
from vllm_kvpress.eviction.attention_mass import extend_by_layer, important_share_report, mean_share_by_layer

VLLM_BASELINE_DTYPES = ("auto", "fp8", "int4_per_token_head")
"""vLLM's own KV-cache dtypes offered as reference rows (with --method none only)."""
DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's default; capped by max_num_batched_tokens, which vLLM requires to be >= max_num_seqs."""


def cuda_gpu_present() -> bool:
    """Whether this machine has a CUDA GPU for vLLM, asked the way vLLM asks (NVML).

    Not `torch.cuda.is_available()`: that initializes CUDA in this process, and vLLM's engine
    process, forked from it before vLLM sees CUDA in use, then fails with "Cannot re-initialize
    CUDA in forked subprocess".
    """
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        method_config,
        *,
        prefill_chunk: int,
        max_model_len: int,
        kv_cache_dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool = False,
        seed: int = 0,
    ):
        """
        Args:
            method_config: a validated method config, or None for vLLM's own attention.
            prefill_chunk: tokens per prefill step (`max_num_batched_tokens`); 0 keeps vLLM's default.
            kv_cache_dtype: vLLM's `kv_cache_dtype`; only "auto" combines with a method.
        """
        from vllm import LLM
        from vllm.platforms import current_platform

        if not cuda_gpu_present():
            raise RuntimeError("--engine vllm needs a CUDA GPU; on CPU use --engine reference")
        if kv_cache_dtype not in VLLM_BASELINE_DTYPES:
            raise ValueError(
                f"--kv-cache-dtype {kv_cache_dtype!r}; allowed: {', '.join(VLLM_BASELINE_DTYPES)}"
            )
        if method_config is not None and kv_cache_dtype != "auto":
            raise ValueError(
                f"--kv-cache-dtype {kv_cache_dtype} is a vLLM baseline and combines only with "
                f"--method none, not {method_config.method}"
            )
        kwargs = {
            "model": model_path,
            "tokenizer": model_path,
            "dtype": "bfloat16",
            "max_model_len": max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            "seed": seed,
            "kv_cache_dtype": kv_cache_dtype,
            "enable_prefix_caching": False,
            # lets `selection_report` read what the method's rule chose in the workers
            "worker_extension_cls": WORKER_EXTENSION,
        }
        if method_config is not None:
            from vllm_kvpress.plugin import register

            # vLLM also loads it through its entry point; called here so a broken install fails early
            register()
            kwargs["additional_config"] = {ADDITIONAL_CONFIG_KEY: method_config.to_dict()}
        if prefill_chunk:
            kwargs.update(
                enable_chunked_prefill=True,
                max_num_batched_tokens=prefill_chunk,
                max_num_seqs=min(DEFAULT_MAX_NUM_SEQS, prefill_chunk),
            )
        self.engine_kwargs = {k: v for k, v in kwargs.items() if k != "model"}
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.device_name = current_platform.get_device_name()  # NVML: CUDA stays uninitialized here
        self.important_shares: dict[int | None, list[float]] = {}
        """Per layer, the important share of every generated request's selection (all workers)."""

    def _drain_important_shares(self) -> list[tuple[int | None, list[float]]]:
        """Every worker's (layer, shares) records since the last drain."""
        return [record for worker in self.llm.collective_rpc("drain_important_shares") for record in worker]

    def generate(self, prompts: list[list[int]], max_tokens: list[int], progress=None) -> list[str]:
        """Greedy completions of token-id prompts (already chat-formatted), all in one batch."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=0.0, max_tokens=n, skip_special_tokens=True) for n in max_tokens]
        self._drain_important_shares()  # nothing recorded outside these generations counts
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=progress is None
        )
        extend_by_layer(self.important_shares, self._drain_important_shares())
        if progress is not None:
            progress.update(len(prompts))
        return [out.outputs[0].text for out in outputs]

    def decode_nll(self, token_ids: list[int], prompt_len: int) -> list[float]:
        raise NotImplementedError(
            "task decode-ppl feeds a text one token per step after its prompt; vLLM's engine decodes "
            "only the tokens it samples; allowed: --engine reference"
        )

    def token_nll(self, token_ids: list[int]) -> list[float]:
        """NLL (nats) of token i given tokens < i, for i = 1..N-1, from vLLM's prompt logprobs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # prompt_logprobs=1 returns the prompt token's own logprob plus the top-1 entry
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        (output,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(token_ids))], params, use_tqdm=False
        )
        entries = output.prompt_logprobs
        if entries is None or len(entries) != len(token_ids):
            raise RuntimeError(
                f"vLLM returned {None if entries is None else len(entries)} prompt logprobs "
                f"for {len(token_ids)} tokens"
            )
        return [-entries[i][token_ids[i]].logprob for i in range(1, len(token_ids))]

    def selection_report(self) -> dict[str, list[float]] | None:
        """The mean over the generated requests (and tensor-parallel ranks, each over its KV heads)
        of each layer's important share, or None where the method's rule records none."""
        return important_share_report(mean_share_by_layer(self.important_shares))

    def close(self) -> None:
        """Free the GPU for the next engine of the same process (vLLM keeps a process per engine core)."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm, self.llm = self.llm, None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
