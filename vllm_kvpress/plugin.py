"""Owns the vLLM plugin entry point (`vllm.general_plugins`: `kvpress = vllm_kvpress.plugin:register`).

vLLM calls `register()` in every process it starts (API server, engine core, each worker, each Ray
actor). It is idempotent, imports nothing heavy at module level, and raises on failure: vLLM only
logs errors that happen while *importing* an entry point, so everything that can fail is in here.
"""

BACKEND_PATH = "vllm_kvpress.backend.backend.KVPressBackend"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_kvpress.backend.spec import patch_attention_kv_cache_spec
    from vllm_kvpress.engine_args import patch_engine_args
    from vllm_kvpress.eviction.manager import register_eviction_spec

    # CUSTOM is never auto-selected, so claiming it changes nothing unless --kv-compression
    # (or --attention-backend CUSTOM) asks for it. The backend module is imported lazily.
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    patch_attention_kv_cache_spec()
    patch_engine_args()
    register_eviction_spec()
    _registered = True
