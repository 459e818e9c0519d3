"""Owns every change vllm-kvpress makes to vLLM's private internals: the porting checklist.

vLLM offers plugins an attention-backend slot (`AttentionBackendEnum.CUSTOM`) and a KV-cache spec
registry, but no hook for a new CLI flag, for a backend's own page size, or for what our metadata
builder must know of each request; the pieces below supply them. `install()` applies them all, is
idempotent, and is called only by `plugin.register()`, which vLLM runs in every process it starts.
Every patch is a wrapper that leaves vLLM's behaviour unchanged for an engine without
`--kv-compression`, and each function below names the vLLM symbol, why it is patched and what
upstream change would remove it. docs/porting.md has them as a table; moving to a newer vLLM means
re-reading each of these symbols there and updating `PINNED_VLLM`.
"""

import contextvars
import os

import torch

from vllm_kvpress.backend.runner import needs_runner_rows
from vllm_kvpress.config import ADDITIONAL_CONFIG_KEY, method_from_vllm_config
from vllm_kvpress.errors import VLLMVersionError
from vllm_kvpress.eviction import prompt_lens
from vllm_kvpress.eviction.compaction_steps import compaction_due

PINNED_VLLM = "0.26.0"
"""The vLLM release every patch below was written against (setup.py pins the same)."""
ALLOW_UNPINNED_ENV = "KVPRESS_ALLOW_UNPINNED_VLLM"
"""Set to 1 to start on another vLLM release anyway (to try a port; nothing is promised)."""
BACKEND_PATH = "vllm_kvpress.backend.backend.KVPressBackend"


def check_vllm_version(installed: str | None = None) -> None:
    """Refuse to start on a vLLM release other than `PINNED_VLLM`, naming both, unless
    `KVPRESS_ALLOW_UNPINNED_VLLM=1`: the patches below reach into private APIs that change between
    releases, and a mismatch would otherwise surface as an obscure failure deep in an engine."""
    if installed is None:
        import vllm

        installed = vllm.__version__
    if installed == PINNED_VLLM or os.environ.get(ALLOW_UNPINNED_ENV) == "1":
        return
    raise VLLMVersionError(
        f"vllm-kvpress supports vLLM {PINNED_VLLM}, but vLLM {installed} is installed: it patches private vLLM "
        f"APIs that change between releases (docs/porting.md). Install vllm=={PINNED_VLLM}, or set "
        f"{ALLOW_UNPINNED_ENV}=1 to try vLLM {installed} anyway"
    )


def register_backend() -> None:
    """vLLM's public slot for an out-of-tree backend: `register_backend(AttentionBackendEnum.CUSTOM,
    path)` (vllm/v1/attention/backends/registry.py). Not a patch; listed because the slot is shared:
    another plugin claiming CUSTOM replaces us. CUSTOM is never auto-selected, so claiming it changes
    nothing unless --kv-compression (or --attention-backend CUSTOM) asks for it; the backend module
    is imported lazily."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as register

    register(AttentionBackendEnum.CUSTOM, BACKEND_PATH)


def patch_engine_args() -> None:
    """Wrap `vllm.engine.arg_utils.EngineArgs.add_cli_args`, `.from_cli_args` and
    `.create_engine_config`.

    Why: vLLM builds its CLI from `EngineArgs`' dataclass fields and offers plugins no hook for new
    flags; `from_cli_args` copies only dataclass fields (so `--kv-compression` would be dropped); and
    `create_engine_config` is the one place every entry point (`vllm serve`, `LLM(...)`) passes
    before any GPU memory is touched, where our settings are validated and the vLLM settings they
    imply are set (engine_args.py). Upstream fix: a plugin hook to add engine arguments that land in
    `additional_config`, and one to validate a `VllmConfig` when it is created."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvpress import engine_args

    if getattr(EngineArgs, "_kvpress_patched", False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__
    original_create = EngineArgs.create_engine_config

    def add_cli_args(parser):
        return engine_args.add_cli_args(original_add(parser))

    def from_cli_args(cls, args):
        return engine_args.fold_cli_settings(original_from(cls, args), args)

    def create_engine_config(self, *args, **kwargs):
        method = engine_args.prepare_engine_args(self)
        vllm_config = original_create(self, *args, **kwargs)
        if method is not None:
            engine_args.finish_engine_config(vllm_config, method)
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._kvpress_patched = True


def patch_attention_kv_cache_spec() -> None:
    """Wrap `vllm.model_executor.layers.attention.attention.Attention.get_kv_cache_spec`.

    Why: a backend cannot declare its page size; vLLM builds every layer's `FullAttentionSpec` from
    the model dtype, and sizes its block pool as available bytes // page bytes. Layers served by our
    backend report our spec instead (backend/spec.py), with the compressed page size, so vLLM's own
    memory profiling hands out proportionally more blocks (vLLM's TurboQuant does the same in-tree).
    Other layers are untouched. Upstream fix: an `AttentionBackend.get_kv_cache_spec` hook."""
    from vllm.model_executor.layers.attention.attention import Attention

    from vllm_kvpress.backend.spec import compressed_spec_for_layer

    if getattr(Attention.get_kv_cache_spec, "_kvpress_wrapped", False):
        return
    original = Attention.get_kv_cache_spec

    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if spec is None or not getattr(self.get_attn_backend(), "is_kvpress_backend", False):
            return spec
        return compressed_spec_for_layer(spec, vllm_config)

    get_kv_cache_spec._kvpress_wrapped = True  # type: ignore[attr-defined]
    Attention.get_kv_cache_spec = get_kv_cache_spec


def register_eviction_block_manager() -> None:
    """Register `KVPressEvictionSpec` with `EvictionBlockManager` in
    `vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry` (backend/spec.py, backend/block_manager.py).

    Why it touches private names: vLLM registers its built-in specs only while the registry is empty
    (`_ensure_registered`), so they are registered first: ours alone in an empty registry would leave
    plain `FullAttentionSpec` layers without a manager; `_REGISTRY_KVCACHESPEC_LIST` keeps it
    idempotent. The uniform-type base is our spec itself, so a mix of our layers and plain ones is
    never one group whose manager comes from whichever layer is first. Upstream fix: a registry that
    registers its built-ins at import and accepts a repeated registration."""
    from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST, KVCacheSpecRegistry

    from vllm_kvpress.backend.block_manager import EvictionBlockManager
    from vllm_kvpress.backend.spec import KVPressEvictionSpec

    if KVPressEvictionSpec in _REGISTRY_KVCACHESPEC_LIST:
        return
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        KVPressEvictionSpec, EvictionBlockManager, uniform_type_base_spec=KVPressEvictionSpec
    )


def _runner_method(runner):
    """The method of a model runner's engine, or None without --kv-compression (cached on it)."""
    if "_kvpress_method" not in runner.__dict__:
        config = runner.vllm_config
        carried = ADDITIONAL_CONFIG_KEY in (config.additional_config or {})
        runner._kvpress_method = method_from_vllm_config(config) if carried else None
    return runner._kvpress_method


def wrap_prepare_inputs(prepare_inputs):
    """`GPUModelRunner.prepare_inputs` that, for an engine whose builder reads them, fills each
    row's prompt length and records its request-state slot; other engines' batches are untouched."""

    def prepare_inputs_with_rows(self, scheduler_output, batch_desc):
        batch = prepare_inputs(self, scheduler_output, batch_desc)
        method = _runner_method(self)
        if method is not None and needs_runner_rows(method):
            if batch.prompt_lens is None:
                batch.prompt_lens = torch.from_numpy(self.req_states.prompt_len.np[batch.idx_mapping_np])
            prompt_lens.record_step_slots(batch.prompt_lens, batch.idx_mapping_np)
        return batch

    prepare_inputs_with_rows._kvpress_wrapped = True  # type: ignore[attr-defined]
    return prepare_inputs_with_rows


def patch_v2_runner_prompt_lens() -> None:
    """Wrap `vllm.v1.worker.gpu.model_runner.GPUModelRunner.prepare_inputs` (the V2 model runner).

    Why: the metadata builder must know each row's prompt length, to find the steps that compact a
    request and to hide its freed blocks from the kernels afterwards, and each row's request-state
    slot (`InputBatch.idx_mapping_np`), under which a request's recent queries and exact tail keys
    are kept while its batch row changes between steps. vLLM 0.26.0 fills
    `InputBatch.prompt_lens` (forwarded as `CommonAttentionMetadata.rswa_prefix_lens`) only for
    R-SWA models and forwards no slots; the wrapper fills the prompt lengths from the runner's
    host-side state (no device sync) and records the slots beside them (eviction/prompt_lens.py).
    Only our builder reads the field when `rswa_window` is unset. Upstream fix: prompt lengths and
    request-state slots in `CommonAttentionMetadata` for every model."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    if getattr(GPUModelRunner.prepare_inputs, "_kvpress_wrapped", False):
        return
    GPUModelRunner.prepare_inputs = wrap_prepare_inputs(GPUModelRunner.prepare_inputs)


_runner_step: contextvars.ContextVar = contextvars.ContextVar("kvpress_runner_step", default=None)
"""(runner, scheduler_output, evicting method, its head packing) of the `execute_model` in progress."""


def wrap_dispatch(dispatch):
    """`dispatch_cg_and_sync_dp` that sees a batch with a compacting row as non-uniform."""

    def dispatch_cg_and_sync_dp(cudagraph_manager, num_reqs, num_tokens, uniform_token_count, *args, **kwargs):
        step = _runner_step.get()
        if uniform_token_count is not None and step is not None:
            runner, scheduler_output, eviction, packing = step
            if compaction_due(runner.req_states, scheduler_output.num_scheduled_tokens, eviction.budget,
                              eviction.block_size, packing, eviction.interval_blocks):
                uniform_token_count = None
        return dispatch(cudagraph_manager, num_reqs, num_tokens, uniform_token_count, *args, **kwargs)

    dispatch_cg_and_sync_dp._kvpress_wrapped = True  # type: ignore[attr-defined]
    return dispatch_cg_and_sync_dp


def wrap_execute_model(execute_model):
    """`GPUModelRunner.execute_model` that tells the dispatch which runner and step it serves, for
    an engine whose method evicts tokens."""

    def execute_model_in_step(self, scheduler_output, *args, **kwargs):
        method = _runner_method(self)
        step = None
        if method is not None and method.eviction is not None:
            if "_kvpress_packing" not in self.__dict__:  # the schedule's packing depends on the model's heads
                model_config = self.vllm_config.model_config
                heads = model_config.get_num_kv_heads(self.vllm_config.parallel_config)
                self._kvpress_packing = method.eviction.middle_packing(heads, model_config.get_head_size())
            step = (self, scheduler_output, method.eviction, self._kvpress_packing)
        token = _runner_step.set(step)
        try:
            return execute_model(self, scheduler_output, *args, **kwargs)
        finally:
            _runner_step.reset(token)

    return execute_model_in_step


def patch_v2_runner_compaction_steps() -> None:
    """Wrap `vllm.v1.worker.gpu.model_runner.GPUModelRunner.execute_model` and the module's
    `dispatch_cg_and_sync_dp` it calls (the V2 model runner).

    Why: the attention layer compacts a request in Python right after the step that completes its
    prompt or reaches a decode-time eviction point, and the block manager frees the evicted blocks
    after that step whatever happened on the GPU. A step replayed as a FULL CUDA graph runs only the
    captured kernels: its compaction would be skipped. vLLM replays FULL graphs only for uniform
    decode batches, picked in `dispatch_cg_and_sync_dp(..., uniform_token_count, ...)` after the
    runner has brought its request state up to date; the wrappers hand it `uniform_token_count=None`
    when a row of the step compacts (eviction/compaction_steps.py), so the step runs with PIECEWISE
    graphs, in which attention runs eagerly. Upstream fix: a backend hook to veto a FULL graph for
    a step (vLLM's `AttentionCGSupport` is per backend, not per step)."""
    from vllm.v1.worker.gpu import model_runner

    if getattr(model_runner.dispatch_cg_and_sync_dp, "_kvpress_wrapped", False):
        return
    model_runner.dispatch_cg_and_sync_dp = wrap_dispatch(model_runner.dispatch_cg_and_sync_dp)
    model_runner.GPUModelRunner.execute_model = wrap_execute_model(model_runner.GPUModelRunner.execute_model)


PATCHES = (
    register_backend,
    patch_engine_args,
    patch_attention_kv_cache_spec,
    register_eviction_block_manager,
    patch_v2_runner_prompt_lens,
    patch_v2_runner_compaction_steps,
)
"""Everything `install` applies, in order: the porting checklist (docs/porting.md)."""


def install() -> None:
    """Check the vLLM version, then apply every patch (each is idempotent)."""
    check_vllm_version()
    for patch in PATCHES:
        patch()
