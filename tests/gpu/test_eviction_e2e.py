"""Token eviction in vLLM 0.26.0 on the GPU: the blocks of evicted prompt tokens go back to vLLM's
free pool, with CUDA graphs and chunked prefill on (vLLM's defaults). Each engine runs in its own
process; the engine core runs in that process too (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the test
can read the scheduler's block pool between steps.

    pytest -m gpu tests/gpu/test_eviction_e2e.py -s
"""

import json
from pathlib import Path

import pytest
from helpers import run_script

from vllm_kvpress.config import load_method_config

pytestmark = pytest.mark.gpu

LLAMA_CONFIG = Path(__file__).parents[2] / "vllm_kvpress" / "bench" / "model_configs" / "llama-3.1-8b"
PROMPT_LEN, BUDGET, BLOCK = 16000, 2048, 64
LLAMA_KV_HEADS, LLAMA_HEAD_SIZE = 8, 128

FREE_BLOCK_TRACE = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import numpy as np
from vllm import LLM, SamplingParams
model, settings, prompt_len, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, max_model_len=16640,
          gpu_memory_utilization=0.6, seed=0, additional_config={"kv_compression": settings})
engine = llm.llm_engine
pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
ids = np.random.default_rng(0).integers(1000, 100000, prompt_len).tolist()
trace = [pool.get_num_free_blocks()]
engine.add_request("r0", {"prompt_token_ids": ids}, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                   detokenize=False))
outputs = []
while engine.has_unfinished_requests():
    outputs += engine.step()
    trace.append(pool.get_num_free_blocks())
print("RESULT " + json.dumps({"trace": trace, "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
                              "generated": len(outputs[-1].outputs[0].token_ids)}))
"""


# (settings, prompt blocks freed after the compaction): snapkv keeps BUDGET tokens; razor keeps
# K = ceil((4 + 1 + 1024) / 64) = 17 blocks for every head and packs the 2 retrieval heads (of 8)'s
# other 233 blocks into ceil(233 * 2 / 8) = 59 (dummy weights: heads 0 and 1 of every layer)
EVICTING = [
    ({"method": "snapkv", "budget": BUDGET, "bits": 4}, PROMPT_LEN // BLOCK - BUDGET // BLOCK),
    ({"method": "razor", "window": 1024, "sink": 4, "bits": 4, "head_choice": "first"}, PROMPT_LEN // BLOCK - 17 - 59),
    # a composition no kernel was written for: KVCrush's choice kept in GEAR 4-bit pages
    ({"method": "kvcrush", "pages": "gear", "bits": 4, "budget": BUDGET}, PROMPT_LEN // BLOCK - BUDGET // BLOCK),
    # MiKV: the important blocks at 8 bits and every other prompt token in 2-bit units packed behind
    # them; the schedule (eviction/policy.py) says how many leading blocks a prompt keeps
    ({"method": "mikv"}, PROMPT_LEN // BLOCK - load_method_config({"method": "mikv"}).kept_prompt_blocks(
        PROMPT_LEN, LLAMA_KV_HEADS, LLAMA_HEAD_SIZE)),
]


def _free_block_trace(settings: dict, max_tokens: int) -> dict:
    return run_script(FREE_BLOCK_TRACE, str(LLAMA_CONFIG), json.dumps(settings), str(PROMPT_LEN), str(max_tokens))[0]


@pytest.mark.parametrize("settings,freed", EVICTING, ids=["snapkv", "razor", "kvcrush-on-gear4", "mikv"])
def test_evicted_prompt_blocks_return_to_the_free_pool(settings, freed):
    result = _free_block_trace(settings, 32)
    trace = result["trace"]
    print(settings, "free blocks per step:", trace)
    lowest = min(trace)
    full_prompt_blocks = -(-PROMPT_LEN // BLOCK)
    # during prefill the whole prompt is held (the scheduler admits on the full length) ...
    assert trace[0] - lowest >= full_prompt_blocks
    # ... and after the compaction step the evicted blocks are back: the prompt keeps its kept
    # blocks plus its tail block (16000 = 250 x 64, so the tail holds the decode tokens)
    after = trace[trace.index(lowest):]
    assert max(after) - lowest >= freed
    assert result["generated"] == 32
    assert trace[-1] == trace[0]  # everything back once the request finished


def test_decode_time_eviction_returns_blocks_while_the_request_generates():
    """scissorhands with decode_interval 128 (2 blocks): after the prompt's compaction the request
    holds its 32 kept blocks and the blocks since the last round, never more than 32 + 2 + 1,
    through 600 generated tokens (4 rounds)."""
    settings = {"method": "scissorhands", "budget": BUDGET, "bits": 4, "decode_interval": 128}
    result = _free_block_trace(settings, 600)
    trace = result["trace"]
    print(settings, "free blocks per step:", trace)
    assert result["generated"] == 600
    compacted = trace.index(min(trace)) + 3  # the compaction step's output is processed by then
    held = [trace[0] - free for free in trace[compacted:-1]]
    assert max(held) <= BUDGET // BLOCK + 2 + 1
    # without decode-time eviction the request would hold 32 + ceil(600 / 64) + 1 blocks by the end
    assert held[-1] < BUDGET // BLOCK + 600 // BLOCK
    assert trace[-1] == trace[0]


GREEDY_TOKENS = """
import json, sys
import numpy as np
from vllm import LLM, SamplingParams
model, settings, prompt_len, mode = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, max_model_len=16640,
          gpu_memory_utilization=0.6, seed=0, max_num_batched_tokens=CHUNK,
          compilation_config={"cudagraph_mode": mode}, additional_config={"kv_compression": settings})
ids = np.random.default_rng(0).integers(1000, 100000, prompt_len).tolist()
params = SamplingParams(max_tokens=int(sys.argv[5]), temperature=0, ignore_eos=True, detokenize=False)
print("RESULT " + json.dumps(list(llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids)))
"""
CHUNK = 8192


def _greedy_tokens(settings: dict, prompt_len: int, mode: str, max_tokens: int = 16) -> list[int]:
    script = GREEDY_TOKENS.replace("CHUNK", str(CHUNK))
    return run_script(script, str(LLAMA_CONFIG), json.dumps(settings), str(prompt_len), mode, str(max_tokens))[0]


def test_a_prompt_completed_by_a_one_token_chunk_is_compacted_under_full_graphs():
    """A prompt of CHUNK + 1 tokens ends with a one-token chunk in a batch of its own: a uniform decode
    batch, which vLLM would replay as a FULL CUDA graph, skipping the compaction in Python while the
    block manager frees the blocks (eviction/compaction_steps.py). With PIECEWISE graphs only,
    attention always runs eagerly; both must generate the same tokens."""
    settings = {"method": "snapkv", "budget": BUDGET, "bits": 4}
    full = _greedy_tokens(settings, CHUNK + 1, "FULL_AND_PIECEWISE")
    piecewise = _greedy_tokens(settings, CHUNK + 1, "PIECEWISE")
    assert len(full) == 16 and full == piecewise



def test_decode_time_eviction_steps_are_compacted_under_full_graphs():
    """Every decode step that reaches a decode-time eviction point (here after 4, 68 and 132
    generated tokens: a 4156-token prompt, rounds every 64 tokens after its 64 full blocks) would
    be a FULL-graph replay; the dispatch wrapper runs it with PIECEWISE graphs so that it compacts.
    Both modes must generate the same tokens."""
    settings = {"method": "scissorhands", "budget": BUDGET, "bits": 4, "decode_interval": 64}
    full = _greedy_tokens(settings, 4156, "FULL_AND_PIECEWISE", 140)
    piecewise = _greedy_tokens(settings, 4156, "PIECEWISE", 140)
    assert len(full) == 140 and full == piecewise
