"""Owns telling which steps compact, so that they are kept out of FULL CUDA graphs.

The attention layer compacts a request in Python right after the step that completes its prompt
or reaches a decode-time eviction point (backend/impl.py), and the scheduler's block manager frees
the evicted blocks after that step whatever happened on the GPU. A step replayed as a FULL CUDA
graph runs only the captured kernels: its compaction would be skipped, and every later step would
read uncompacted tokens through the compacted view. vLLM replays FULL graphs only for uniform
decode batches (one token per row), so the cases are a prompt whose last chunk is a single token
in a batch of decodes (a prompt one token longer than the chunk it got), and every decode step at
which a row reaches a decode-time eviction point (one step in `decode_interval` per request).

vLLM 0.26.0's V2 model runner picks the graph in `execute_model` through
`dispatch_cg_and_sync_dp(..., uniform_token_count, ...)`, after it has brought its per-request state
up to date for the step. Its wrapper (vllm_kvpress/vllm_patches.py) hands that dispatch
`uniform_token_count=None` when `compaction_due` says a row of the step compacts: no FULL graph
matches a non-uniform batch, so the step runs with PIECEWISE graphs, in which attention (and so
compaction) runs eagerly.
"""

import numpy as np

from vllm_kvpress.eviction.policy import Budget, Packing, freed_end


def compaction_due(req_states, num_scheduled_tokens: dict[str, int], budget: Budget, block_size: int,
                   packing: Packing | None = None, interval_blocks: int = 0) -> bool:
    """Whether a scheduled row compacts in this step: the blocks freed after it
    (`policy.freed_end` at computed + new tokens) are more than those freed before it.

    Args:
        req_states: the V2 runner's `RequestState`, already updated for this step.
        num_scheduled_tokens: request id -> tokens this step computes for it.
    """
    rows = [(index, num_new) for req_id, num_new in num_scheduled_tokens.items()
            if (index := req_states.req_id_to_index.get(req_id)) is not None]
    if not rows:
        return False
    # one vectorised schedule per step: this runs before every step's graph dispatch
    index, num_new = (np.asarray(column, dtype=np.int64) for column in zip(*rows, strict=True))
    computed = req_states.num_computed_tokens_np[index].astype(np.int64)
    prompt = req_states.prompt_len.np[index].astype(np.int64)
    schedule = (budget, block_size, packing, interval_blocks)
    return bool((freed_end(prompt, computed + num_new, *schedule) > freed_end(prompt, computed, *schedule)).any())
