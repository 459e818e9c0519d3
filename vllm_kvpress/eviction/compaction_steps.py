"""Owns keeping the steps that compact out of FULL CUDA graphs.

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
up to date for the step. The wrapper below hands that dispatch `uniform_token_count=None` when a
row of the step compacts: no FULL graph matches a non-uniform batch, so the
step runs with PIECEWISE graphs, in which attention (and so compaction) runs eagerly.
"""

import contextvars

import numpy as np

from vllm_kvpress.eviction.policy import Budget, HeadPacking, freed_end

_runner_step: contextvars.ContextVar = contextvars.ContextVar("kvpress_runner_step", default=None)
"""(runner, scheduler_output, eviction config) of the `execute_model` call in progress."""


def compaction_due(req_states, num_scheduled_tokens: dict[str, int], budget: Budget, block_size: int,
                   packing: HeadPacking | None = None, interval_blocks: int = 0) -> bool:
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


def wrap_dispatch(dispatch):
    """`dispatch_cg_and_sync_dp` that sees a batch with a compacting row as non-uniform."""

    def dispatch_cg_and_sync_dp(cudagraph_manager, num_reqs, num_tokens, uniform_token_count, *args, **kwargs):
        step = _runner_step.get()
        if uniform_token_count is not None and step is not None:
            runner, scheduler_output, config = step
            if compaction_due(runner.req_states, scheduler_output.num_scheduled_tokens, config.budget,
                              config.block_size, getattr(runner, "_kvpress_packing", None),
                              config.interval_blocks):
                uniform_token_count = None
        return dispatch(cudagraph_manager, num_reqs, num_tokens, uniform_token_count, *args, **kwargs)

    dispatch_cg_and_sync_dp._kvpress_wrapped = True  # type: ignore[attr-defined]
    return dispatch_cg_and_sync_dp


def wrap_execute_model(execute_model):
    """`GPUModelRunner.execute_model` that tells the dispatch which runner and step it serves; the
    method's settings come from the runner's own `vllm_config`."""

    def execute_model_in_step(self, scheduler_output, *args, **kwargs):
        config = getattr(self, "_kvpress_method_config", None)
        if config is None:
            from vllm_kvpress.backend.state import method_config_from_vllm_config

            config = self._kvpress_method_config = method_config_from_vllm_config(self.vllm_config)
            if config.evicts_tokens:  # head-wise packing (razor) depends on the KV heads per layer
                heads = self.vllm_config.model_config.get_num_kv_heads(self.vllm_config.parallel_config)
                self._kvpress_packing = config.packing(heads)
        token = _runner_step.set((self, scheduler_output, config) if config.evicts_tokens else None)
        try:
            return execute_model(self, scheduler_output, *args, **kwargs)
        finally:
            _runner_step.reset(token)

    return execute_model_in_step


def patch_v2_runner_compaction_steps() -> None:
    """Wrap vLLM 0.26.0 `GPUModelRunner.execute_model` and the `dispatch_cg_and_sync_dp` it calls
    (idempotent)."""
    from vllm.v1.worker.gpu import model_runner

    if getattr(model_runner.dispatch_cg_and_sync_dp, "_kvpress_wrapped", False):
        return
    model_runner.dispatch_cg_and_sync_dp = wrap_dispatch(model_runner.dispatch_cg_and_sync_dp)
    model_runner.GPUModelRunner.execute_model = wrap_execute_model(model_runner.GPUModelRunner.execute_model)
