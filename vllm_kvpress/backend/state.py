"""Owns how the backend gets the active method inside vLLM processes (engine core, workers).

The settings travel in `VllmConfig.additional_config`, which vLLM pickles to every process; turning
them into a method is the config layer's work (vllm_kvpress/config.py), which sits above the
backend. `plugin.register()`, which vLLM runs in every process before it builds a model, installs
that reader here, so the backend calls the method's hooks without knowing any method.
"""

from collections.abc import Callable

_method_reader: Callable | None = None


def install_method_reader(reader: Callable) -> None:
    """`reader(vllm_config)` returns the validated method the config carries (or raises)."""
    global _method_reader
    _method_reader = reader


def method_from_vllm_config(vllm_config):
    """The method (`methods/base.py` `CompressionMethod`) carried by `vllm_config`."""
    if _method_reader is None:
        raise RuntimeError(
            "vllm-kvpress's vLLM plugin has not been registered in this process: vLLM runs "
            "`vllm_kvpress.plugin:register` (entry point group vllm.general_plugins) in every process it "
            "starts; outside vLLM, call vllm_kvpress.plugin.register() first"
        )
    return _method_reader(vllm_config)


def current_method():
    """The method of the vLLM config being built or run in this process."""
    from vllm.config import get_current_vllm_config

    return method_from_vllm_config(get_current_vllm_config())
