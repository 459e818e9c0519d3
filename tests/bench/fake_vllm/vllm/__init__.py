"""A stand-in for the few `vllm` names the offline worker uses, for CPU tests of the worker process.

Capacity depends on the configuration the way it does in vLLM (fewer bytes per token, more
blocks), and generation returns objects shaped like vLLM 0.26.0's RequestOutput, so the runner,
the worker and the result files are exercised end to end without a GPU. `kivi` raises at engine
start, to check that one configuration's failure leaves the others running.

While `generate` runs, the scheduler gauges (`vllm:num_requests_running`, `..._waiting`,
`vllm:kv_cache_usage_perc`) hold what vLLM's scheduler would reach: as many requests as fit in
the KV blocks at their full length (eviction methods: their `budget` of prompt tokens plus the
output), at most `max_num_seqs`. Real batches hold such a level for many decode steps; here the
level is held until a thread other than the one in `generate` has read it (at most
`SAMPLED_WAIT_S`), so the worker's gauge sampler is tested without timing luck, and a worker
that samples nothing while `generate` runs gets no figure.
"""

import itertools
import math
import threading
import time
from types import SimpleNamespace

from vllm.v1.metrics.reader import Counter, Gauge

__version__ = "0.26.0+fake"
BLOCKS_PER_DTYPE = {"auto": 1000, "fp8": 2000, "int4_per_token_head": 3760}
BLOCK_SIZE = 16
SAMPLED_WAIT_S = 2.0
_request_ids = itertools.count()


class SamplingParams:
    def __init__(self, max_tokens, ignore_eos, temperature, detokenize):
        assert ignore_eos and temperature == 0.0 and not detokenize
        self.max_tokens = max_tokens


class LLM:
    def __init__(self, **kwargs):
        assert kwargs["load_format"] == "dummy" and kwargs["skip_tokenizer_init"] is True
        assert kwargs["disable_log_stats"] is False, "per-request metrics need stats on"
        self.method_settings = (kwargs.get("additional_config") or {}).get("kv_compression", {})
        method = self.method_settings.get("method")
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
        self.max_num_seqs = kwargs["max_num_seqs"]
        self.gauges = dict.fromkeys(
            ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"), 0
        )
        self._generating: threading.Thread | None = None
        self._sampled = threading.Event()

    def held_blocks(self, prompt_len: int, output_len: int) -> int:
        """KV blocks one request holds at its end: eviction keeps `budget` prompt tokens."""
        budget = self.method_settings.get("budget")
        if isinstance(budget, float):
            prompt_len = math.ceil(budget * prompt_len)
        elif budget is not None:
            prompt_len = min(prompt_len, budget)
        block_size = self.llm_engine.vllm_config.cache_config.block_size
        return math.ceil((prompt_len + output_len) / block_size)

    def _hold_peak(self, prompts, params) -> None:
        blocks = self.llm_engine.vllm_config.cache_config.num_gpu_blocks
        per_request = self.held_blocks(max(len(p["prompt_token_ids"]) for p in prompts), params.max_tokens)
        running = max(1, min(len(prompts), self.max_num_seqs, blocks // per_request))
        self.gauges.update(
            {
                "vllm:num_requests_running": running,
                "vllm:num_requests_waiting": len(prompts) - running,
                "vllm:kv_cache_usage_perc": running * per_request / blocks,
            }
        )
        self._sampled.clear()
        self._generating = threading.current_thread()  # from here on, a read sees the peak
        self._sampled.wait(SAMPLED_WAIT_S)
        self.gauges.update(dict.fromkeys(self.gauges, 0))
        self._generating = None

    def generate(self, prompts, params, use_tqdm=True):
        # as vLLM 0.26.0's LLM._run_engine calls a callable use_tqdm (entrypoints/offline_utils.py)
        bar = (
            use_tqdm(total=len(prompts), desc="Processed prompts", dynamic_ncols=True, postfix="")
            if callable(use_tqdm)
            else None
        )
        time.sleep(20.0 / self.speed)  # more capacity, less time: ratios that differ from 1
        self._hold_peak(prompts, params)
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
        if self._generating not in (None, threading.current_thread()):
            self._sampled.set()
        labels = {"engine": "0", "model_name": "bench"}
        return [Counter(name=name, labels=labels, value=value) for name, value in self.counters.items()] + [
            Gauge(name=name, labels=labels, value=value) for name, value in self.gauges.items()
        ]
