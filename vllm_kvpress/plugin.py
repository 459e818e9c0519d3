"""Owns the vLLM plugin entry point (`vllm.general_plugins`: `kvpress = vllm_kvpress.plugin:register`).

vLLM calls `register()` in every process it starts (API server, engine core, each worker, each Ray
actor). It is idempotent, imports nothing heavy at module level, and raises on failure: vLLM only
logs errors that happen while *importing* an entry point, so everything that can fail is in here.
"""

_registered = False


def register() -> None:
    """Refuse an unsupported vLLM release, apply the patches of vLLM's internals (vllm_patches.py)
    and let the backend read the active method through the config layer (backend/state.py)."""
    global _registered
    if _registered:
        return
    from vllm_kvpress import vllm_patches
    from vllm_kvpress.backend import state
    from vllm_kvpress.config import method_from_vllm_config

    vllm_patches.install()
    state.install_method_reader(method_from_vllm_config)
    _registered = True
