"""vllm_patches.py: every patch is installed by plugin.register() alone, once, and leaves an engine
without --kv-compression as vLLM made it; the runner wrapper fills prompt lengths and request-state
slots only for engines whose builder reads them, from the names vLLM 0.26.0's V2 runner has.

Tests that import vLLM's runner modules take the CPU platform first, as every engine-config test
does: those modules bind the platform when first imported."""

import dataclasses
import inspect
import re
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_kvpress import vllm_patches
from vllm_kvpress.eviction import prompt_lens


def _runner(settings: dict | None):
    additional = {} if settings is None else {"kv_compression": settings}
    return SimpleNamespace(vllm_config=SimpleNamespace(additional_config=additional),
                           req_states=SimpleNamespace(prompt_len=SimpleNamespace(np=np.array([0, 700, 0, 90]))))


def _prepared(runner):
    batch = SimpleNamespace(prompt_lens=None, idx_mapping_np=np.array([3, 1], dtype=np.int32))
    return vllm_patches.wrap_prepare_inputs(lambda self, scheduler_output, batch_desc: batch)(runner, None, None)


@pytest.mark.parametrize("settings,fills", [
    (None, False),  # vLLM without the plugin's method: untouched
    ({"method": "kivi", "tail_keys": "staged"}, False),  # quantizing only: its builder needs no rows
    ({"method": "kivi", "tail_keys": "exact"}, True),  # exact tails live under request-state slots
    ({"method": "snapkv"}, True),  # eviction needs every row's prompt length
])
def test_prepare_inputs_fills_rows_only_for_engines_that_read_them(monkeypatch, settings, fills):
    monkeypatch.setattr(prompt_lens, "_step_slots", None)
    batch = _prepared(_runner(settings))
    if not fills:
        assert batch.prompt_lens is None and prompt_lens._step_slots is None
        return
    assert batch.prompt_lens.tolist() == [90, 700]
    assert prompt_lens.request_slots_for(batch.prompt_lens).tolist() == [3, 1]


def test_the_names_the_wrappers_read_are_vllms(cpu_platform):
    """What the prepare_inputs wrapper reads and returns, in vLLM 0.26.0's own source (the class
    attribute may be our wrapper already, so the source is read, not the function)."""
    from vllm.v1.worker.gpu import model_runner
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.states import RequestState

    assert {"prompt_lens", "idx_mapping_np"} <= {f.name for f in dataclasses.fields(InputBatch)}
    source = inspect.getsource(model_runner)
    assert re.search(r"def prepare_inputs\(\s*self,\s*scheduler_output[^,]*,\s*batch_desc", source)
    assert "self.prompt_len" in inspect.getsource(RequestState)


def test_register_installs_every_patch_once(cpu_platform):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.worker.gpu import model_runner

    from vllm_kvpress import plugin

    plugin.register()
    installed = (EngineArgs.create_engine_config, Attention.get_kv_cache_spec,
                 model_runner.GPUModelRunner.prepare_inputs, model_runner.GPUModelRunner.execute_model,
                 model_runner.dispatch_cg_and_sync_dp)
    vllm_patches.install()  # again: nothing wraps twice
    assert (EngineArgs.create_engine_config, Attention.get_kv_cache_spec,
            model_runner.GPUModelRunner.prepare_inputs, model_runner.GPUModelRunner.execute_model,
            model_runner.dispatch_cg_and_sync_dp) == installed
    assert model_runner.GPUModelRunner.prepare_inputs._kvpress_wrapped
    assert model_runner.GPUModelRunner.execute_model.__name__ == "execute_model_in_step"
