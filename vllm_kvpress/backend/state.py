"""Owns reading the active compression settings inside vLLM processes (engine core, workers).

They travel in `VllmConfig.additional_config`, which vLLM pickles to every process; nothing else
is shared, so every reader goes through here.
"""

import functools

from vllm_kvpress.config import ADDITIONAL_CONFIG_KEY, load_method_config
from vllm_kvpress.errors import KVCompressionConfigError
from vllm_kvpress.methods import MethodConfig


@functools.lru_cache(maxsize=8)
def _cached_method_config(frozen_settings: tuple) -> MethodConfig:
    return load_method_config(dict(frozen_settings))


def method_config_from_vllm_config(vllm_config) -> MethodConfig:
    """The validated method config carried by `vllm_config`, or a clear error if there is none."""
    settings = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    if settings is None:
        raise KVCompressionConfigError(
            "the CUSTOM attention backend is vllm-kvpress, but no compression method is configured; "
            "pass --kv-compression NAME, or additional_config={'kv_compression': {'method': NAME}}"
        )
    return _cached_method_config(tuple(sorted(settings.items())))


def current_method_config() -> MethodConfig:
    """The method config of the vLLM config being built or run in this process."""
    from vllm.config import get_current_vllm_config

    return method_config_from_vllm_config(get_current_vllm_config())
