"""eviction/compaction_steps.py and its vLLM wrappers (vllm_patches.py): a step that completes a
compacting prompt never replays a FULL CUDA graph (which would skip the compaction while the block
manager frees the blocks)."""

import inspect
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_kvpress.config import load_method_config
from vllm_kvpress.eviction.compaction_steps import compaction_due
from vllm_kvpress.vllm_patches import patch_v2_runner_compaction_steps, wrap_dispatch, wrap_execute_model

CONFIG = load_method_config({"method": "snapkv", "budget": 2048})  # block size 64


def _states(rows: dict[str, tuple[int, int]]):
    """A V2 `RequestState` stand-in: request id -> (computed tokens, prompt length)."""
    computed = np.array([c for c, _ in rows.values()], dtype=np.int32)
    prompt = np.array([p for _, p in rows.values()], dtype=np.int32)
    return SimpleNamespace(req_id_to_index={r: i for i, r in enumerate(rows)}, num_computed_tokens_np=computed,
                           prompt_len=SimpleNamespace(np=prompt))


@pytest.mark.parametrize("rows, scheduled, due", [
    ({"a": (8192, 8193), "b": (9000, 100)}, {"a": 1, "b": 1}, True),  # last prompt token, among decodes
    ({"a": (8000, 8193)}, {"a": 193}, True),  # a longer last chunk compacts too
    ({"a": (8193, 8193)}, {"a": 1}, False),  # decoding: compacted already
    ({"a": (0, 8193)}, {"a": 8192}, False),  # the prompt is not complete yet
    ({"a": (2000, 2001)}, {"a": 1}, False),  # within the budget: nothing to compact
    ({"a": (8192, 8193)}, {"gone": 1}, False),  # a row the runner does not hold (dummy runs)
])
def test_compaction_due(rows, scheduled, due):
    assert compaction_due(_states(rows), scheduled, CONFIG.budget, CONFIG.block_size) is due


DECODE_EVICTING = load_method_config({"method": "scissorhands", "budget": 2048, "decode_interval": 512})


@pytest.mark.parametrize("computed, due", [
    (136 * 64 - 1, True),  # reaches 128 + 8 blocks: the first decode round's point
    (136 * 64 - 2, False),
    (136 * 64, False),  # just past it: compacted already
    (144 * 64 - 1, True),  # the second round's point
])
def test_decode_time_eviction_steps_are_due(computed, due):
    rows = {"a": (computed, 8193)}  # P = 8193: full blocks end at block 128
    assert compaction_due(_states(rows), {"a": 1}, DECODE_EVICTING.budget, DECODE_EVICTING.block_size, None,
                          DECODE_EVICTING.interval_blocks) is due
    # without decode-time eviction none of these decode steps compacts
    assert not compaction_due(_states(rows), {"a": 1}, CONFIG.budget, CONFIG.block_size)
    assert _run_step(rows, {"a": 1}, DECODE_EVICTING) == (None if due else 1)


def _run_step(rows, scheduled, config=CONFIG):
    """Run a wrapped execute_model whose body dispatches a uniform decode batch; returns the
    uniform token count the inner dispatch saw."""
    seen = []
    dispatch = wrap_dispatch(lambda mgr, num_reqs, num_tokens, uniform, *a, **k: seen.append(uniform))

    def execute_model(self, scheduler_output):
        dispatch(None, len(scheduled), len(scheduled), 1, 1, 0, need_eager=False)

    runner = SimpleNamespace(req_states=_states(rows), _kvpress_method=config, _kvpress_packing=None)
    wrap_execute_model(execute_model)(runner, SimpleNamespace(num_scheduled_tokens=scheduled))
    return seen[0]


def test_a_compaction_step_is_dispatched_as_non_uniform():
    assert _run_step({"a": (8192, 8193), "b": (9000, 100)}, {"a": 1, "b": 1}) is None
    assert _run_step({"a": (8193, 8193), "b": (9000, 100)}, {"a": 1, "b": 1}) == 1
    # a method that evicts nothing never changes the dispatch
    assert _run_step({"a": (8192, 8193)}, {"a": 1}, load_method_config({"method": "gear"})) == 1
    # outside execute_model (capture, profiling) the dispatch is vLLM's
    seen = []
    wrap_dispatch(lambda *a, **k: seen.append(a[3]))(None, 1, 1, 1)
    assert seen == [1]


def test_vllm_replays_no_full_graph_for_a_non_uniform_batch():
    """The contract the fix relies on: vLLM 0.26.0 matches FULL decode graphs only to uniform batches."""
    from vllm.config import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor, _is_compatible

    full = BatchExecutionDescriptor(CUDAGraphMode.FULL, num_tokens=8, num_reqs=8, uniform_token_count=1)
    piecewise = BatchExecutionDescriptor(CUDAGraphMode.PIECEWISE, num_tokens=8, num_reqs=None)
    assert _is_compatible(full, 4, 4, 1, 0) and not _is_compatible(full, 4, 4, None, 0)
    assert _is_compatible(piecewise, 4, 4, None, 0)


def test_patch_wraps_what_the_v2_runner_calls():
    from vllm.v1.worker.gpu import model_runner
    from vllm.v1.worker.gpu.states import RequestState

    patch_v2_runner_compaction_steps()
    wrapped = model_runner.GPUModelRunner.execute_model, model_runner.dispatch_cg_and_sync_dp
    patch_v2_runner_compaction_steps()  # idempotent: one layer of wrapping
    assert (model_runner.GPUModelRunner.execute_model, model_runner.dispatch_cg_and_sync_dp) == wrapped
    assert model_runner.dispatch_cg_and_sync_dp._kvpress_wrapped
    assert model_runner.GPUModelRunner.execute_model.__name__ == "execute_model_in_step"
    # the names the wrapper reads are vLLM 0.26.0's
    source = inspect.getsource(RequestState)
    assert "self.num_computed_tokens_np" in source and "self.prompt_len" in source
    assert "dispatch_cg_and_sync_dp(" in inspect.getsource(model_runner)
