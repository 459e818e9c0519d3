"""A stand-in for the few `vllm` names the offline worker uses, for CPU tests of the worker process.

Capacity depends on the configuration the way it does in vLLM (fewer bytes per token, more
blocks), and generation returns objects shaped like vLLM 0.26.0's RequestOutput, so the runner,
the worker and the result files are exercised end to end without a GPU. `kivi` raises at engine
start, to check that one configuration's failure leaves the others running.
"""

import itertools
import time
from types import SimpleNamespace

from vllm.v1.metrics.reader import Counter

__version__ = "0.26.0+fake"
BLOCKS_PER_DTYPE = {"auto": 1000, "fp8": 2000, "int4_per_token_head": 3760}
BLOCK_SIZE = 16
_request_ids = itertools.count()


class SamplingParams:
    def __init__(self, max_tokens, ignore_eos, temperature, detokenize):
        assert ignore_eos and temperature == 0.0 and not detokenize
        self.max_tokens = max_tokens


class LLM:
    def __init__(self, **kwargs):
        assert kwargs["load_format"] == "dummy" and kwargs["skip_tokenizer_init"] is True
        assert kwargs["disable_log_stats"] is False, "per-request metrics need stats on"
        method = (kwargs.get("additional_config") or {}).get("kv_compression", {}).get("method")
        if method == "kivi":
            raise RuntimeError("fake engine: kivi fails to start")
        blocks = 3280 if method else BLOCKS_PER_DTYPE[kwargs["kv_cache_dtype"]]
        block_size = 64 if method else BLOCK_SIZE
        cache_config = SimpleNamespace(
            num_gpu_blocks=blocks,
            block_size=block_size,
            kv_cache_size_tokens=blocks * block_size,
            kv_cache_max_concurrency=blocks * block_size / kwargs["max_model_len"],
        )
        self.llm_engine = SimpleNamespace(vllm_config=SimpleNamespace(cache_config=cache_config))
        self.speed = blocks
        self.counters = {
            "vllm:num_preemptions": 0,
            "vllm:prefix_cache_queries": 0,
            "vllm:prefix_cache_hits": 0,
        }
        self.seen_prefixes: set[tuple[int, ...]] = set()

    def generate(self, prompts, params, use_tqdm=True):
        # as vLLM 0.26.0's LLM._run_engine calls a callable use_tqdm (entrypoints/offline_utils.py)
        bar = (
            use_tqdm(total=len(prompts), desc="Processed prompts", dynamic_ncols=True, postfix="")
            if callable(use_tqdm)
            else None
        )
        time.sleep(20.0 / self.speed)  # more capacity, less time: ratios that differ from 1
        outputs = []
        for i, prompt in enumerate(prompts):
            ids = prompt["prompt_token_ids"]
            self.counters["vllm:prefix_cache_queries"] += len(ids)
            hit = max(
                (n for n in range(0, len(ids) + 1, 16) if tuple(ids[:n]) in self.seen_prefixes), default=0
            )
            self.counters["vllm:prefix_cache_hits"] += hit
            self.seen_prefixes.update(tuple(ids[:n]) for n in range(16, len(ids) + 1, 16))
            token_ids = [(len(ids) + k) % 1000 for k in range(params.max_tokens)]
            metrics = SimpleNamespace(
                first_token_latency=0.01 * (i + 1),
                first_token_ts=100.0,
                last_token_ts=100.0 + (params.max_tokens - 1) * 1.0 / self.speed,
                num_generation_tokens=params.max_tokens,
            )
            outputs.append(
                SimpleNamespace(
                    request_id=str(next(_request_ids)),
                    metrics=metrics,
                    outputs=[SimpleNamespace(token_ids=token_ids)],
                )
            )
        if bar is not None:
            bar.update(len(prompts))
            bar.close()
        return outputs

    def get_metrics(self):
        return [
            Counter(name=name, labels={"engine": "0"}, value=value) for name, value in self.counters.items()
        ]
