"""Owns turning what a user typed (`--kv-compression NAME`, `--kv-compression-config JSON|FILE`,
or `additional_config["kv_compression"]`) into one validated, typed method: the method's class from
the registry, its settings over the class's defaults."""

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import yaml

from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.methods.base import CompressionMethod
from vllm_kvpress.methods.registry import method_class

ADDITIONAL_CONFIG_KEY = "kv_compression"
"""Key of our settings inside vLLM's `additional_config`, which vLLM pickles to every process."""


def parse_config_argument(value: str, flag: str = "--kv-compression-config") -> dict[str, Any]:
    """Parse a method-settings flag (`flag`, named in every error): inline JSON, or a path to a
    .json/.yaml/.yml file."""
    if value.endswith((".yaml", ".yml", ".json")) or os.path.isfile(value):
        parsed = _read_config_file(value, flag)
    else:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise KVCompressionConfigError(
                f"{flag} {value!r} is neither valid JSON ({e.msg}) nor an existing "
                "file; allowed: a JSON object such as '{\"bits\": 2}' or a path to a .yaml/.json file"
            ) from None
    if not isinstance(parsed, dict):
        raise KVCompressionConfigError(f"{flag} must be a JSON/YAML object (mapping), got {type(parsed).__name__}")
    return parsed


def _read_config_file(path: str, flag: str) -> Any:
    """A .json/.yaml/.yml file's content; YAML is read safely (no tags that build Python objects)."""
    if not os.path.exists(path):
        raise KVCompressionConfigError(f"{flag} file {path!r} does not exist")
    if not os.path.isfile(path):
        raise KVCompressionConfigError(f"{flag} {path!r} is not a file; allowed: a .yaml/.json file")
    try:
        with open(path) as f:
            return json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except OSError as e:
        raise KVCompressionConfigError(f"{flag} file {path!r} cannot be read: {e.strerror}") from None
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        kind = "JSON" if path.endswith(".json") else "YAML"
        reason = " ".join(str(e).split())
        raise KVCompressionConfigError(
            f"{flag} file {path!r} is not valid {kind} ({reason}); allowed: a mapping of settings "
            "such as 'bits: 2' (YAML, plain values only) or {\"bits\": 2} (JSON)"
        ) from None


def load_method_config(settings: Mapping[str, Any]) -> CompressionMethod:
    """Validate `{"method": NAME, **overrides}` against the method's class and its defaults.

    Raises:
        KVCompressionConfigError: unknown method, unknown key, or a value out of range (all listed).
        MethodNotImplementedError: the method is known but planned, not implemented.
    """
    if not isinstance(settings, Mapping):
        raise KVCompressionConfigError(
            f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a mapping, got {type(settings).__name__}"
        )
    cls = method_class(settings.get("method"))
    return cls.from_settings({k: v for k, v in settings.items() if k != "method"}, method_class)


@functools.lru_cache(maxsize=8)
def _cached_method(frozen_settings: str) -> CompressionMethod:
    return load_method_config(json.loads(frozen_settings))


def method_from_vllm_config(vllm_config) -> CompressionMethod:
    """The validated method carried by `vllm_config` (cached: every attention layer asks), or a
    clear error if there is none."""
    settings = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if settings is None:
        raise KVCompressionConfigError(
            "the CUSTOM attention backend is vllm-kvpress, but no compression method is configured; "
            "pass --kv-compression NAME, or additional_config={'kv_compression': {'method': NAME}}"
        )
    if not isinstance(settings, Mapping):
        return load_method_config(settings)  # raises, naming the type
    return _cached_method(json.dumps(settings, sort_keys=True))


ALLOW_UNVERIFIED_ENV = "KVPRESS_ALLOW_UNVERIFIED_METHODS"
"""`=1` lets vLLM serve a method whose vLLM path has not passed its GPU tests (`Status.REFERENCE_ONLY`):
for the developers who run those tests."""


def check_enabled_in_vllm(method_config: CompressionMethod) -> None:
    """Refuse a method whose vLLM path has not passed its GPU tests (`Status.REFERENCE_ONLY`),
    unless `ALLOW_UNVERIFIED_ENV` is set.

    Raises:
        MethodNotImplementedError: naming the method and where it runs instead.
    """
    if method_config.runs_on_vllm or os.environ.get(ALLOW_UNVERIFIED_ENV) == "1":
        return
    raise MethodNotImplementedError(
        f"--kv-compression {method_config.method}: method '{method_config.method}' is not enabled in vLLM yet: "
        "its vLLM path has not passed its GPU tests; it runs on the reference engine (vllm-kvpress eval "
        f"--engine reference --method {method_config.method}). {ALLOW_UNVERIFIED_ENV}=1 lets its developers "
        "run those tests"
    )
