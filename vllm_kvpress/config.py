"""Owns turning what a user typed (`--kv-compression NAME`, `--kv-compression-config JSON|FILE`,
or `additional_config["kv_compression"]`) into one validated, typed method config."""

import dataclasses
import json
import os
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.methods import CONFIG_CLASSES, METHODS, MethodConfig, Status, available_method_names

ADDITIONAL_CONFIG_KEY = "kv_compression"
"""Key of our settings inside vLLM's `additional_config`, which vLLM pickles to every process."""


def method_defaults(method: str) -> dict[str, Any]:
    """The defaults of an available method, read from its `configs/<method>.yaml`."""
    text = resources.files("vllm_kvpress.configs").joinpath(f"{method}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_config_argument(value: str) -> dict[str, Any]:
    """Parse `--kv-compression-config`: inline JSON, or a path to a .json/.yaml/.yml file."""
    if value.endswith((".yaml", ".yml", ".json")) or os.path.isfile(value):
        if not os.path.isfile(value):
            raise KVCompressionConfigError(f"--kv-compression-config file {value!r} does not exist")
        with open(value) as f:
            parsed = yaml.safe_load(f) if not value.endswith(".json") else json.load(f)
    else:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise KVCompressionConfigError(
                f"--kv-compression-config {value!r} is neither valid JSON ({e.msg}) nor an existing "
                "file; allowed: a JSON object such as '{\"bits\": 2}' or a path to a .yaml/.json file"
            ) from None
    if not isinstance(parsed, dict):
        raise KVCompressionConfigError(
            f"--kv-compression-config must be a JSON/YAML object (mapping), got {type(parsed).__name__}"
        )
    return parsed


def load_method_config(settings: Mapping[str, Any]) -> MethodConfig:
    """Validate `{"method": NAME, **overrides}` against the method's YAML defaults and typed config.

    Raises:
        KVCompressionConfigError: unknown method, unknown key, or a value out of range (all listed).
        MethodNotImplementedError: the method is known but planned, not implemented.
    """
    if not isinstance(settings, Mapping):
        raise KVCompressionConfigError(
            f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a mapping, got {type(settings).__name__}"
        )
    method = settings.get("method")
    if method not in METHODS:
        raise KVCompressionConfigError(
            f"method={method!r} is unknown; allowed: {', '.join(sorted(METHODS))}"
        )
    info = METHODS[method]
    if info.status is Status.PLANNED:
        raise MethodNotImplementedError(
            f"--kv-compression {method}: {info.paper} is planned but not implemented yet "
            f"in vllm-kvpress; available now: {', '.join(available_method_names())}"
        )
    config_cls = CONFIG_CLASSES[method]
    overrides = {k: v for k, v in settings.items() if k != "method"}
    field_names = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(overrides) - set(field_names))
    if unknown:
        raise KVCompressionConfigError(
            f"unknown setting(s) {', '.join(unknown)} for method '{method}'; "
            f"allowed: {', '.join(field_names)}"
        )
    values = {**method_defaults(method), **overrides}
    config = config_cls(**{name: values[name] for name in field_names})
    problems = [f"{method}: {p}" for p in config.problems()]
    if problems:
        raise KVCompressionConfigError(problems)
    return config
