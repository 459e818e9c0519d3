"""Owns what a benchmark configuration is and the vLLM settings each one implies.

A configuration is typed on the command line as
    auto | fp8 | int4_per_token_head | ...     a vLLM `kv_cache_dtype` baseline (no settings)
    gear | kivi:{"bits": 2} | ...              a plugin method with optional JSON settings
Several may share one argument, comma-separated (`auto,fp8,gear:{"bits":2,"rank":0}`): commas
inside the braces belong to the JSON. Plugin settings are validated here, by the same
`load_method_config` vLLM's engine will run, so a typo fails before any GPU time is spent.

One function, `engine_settings`, decides every vLLM setting of a (configuration, engine); the
offline `vllm.LLM(**kwargs)` and the online `vllm serve` flags are both derived from it, so the two
modes cannot drift apart.
"""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vllm_kvpress.config import ADDITIONAL_CONFIG_KEY, check_enabled_in_vllm, load_method_config
from vllm_kvpress.errors import KVCompressionConfigError, MethodNotImplementedError
from vllm_kvpress.methods.registry import method_table

BASELINE_KV_CACHE_DTYPES = (
    "auto",
    "bfloat16",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
    "int8_per_token_head",
    "fp8_per_token_head",
    "int4_per_token_head",
    "nvfp4",
    "turboquant_k8v4",
    "turboquant_4bit_nc",
    "turboquant_k3v4_nc",
    "turboquant_3bit_nc",
)
"""vLLM 0.26.0 `CacheDType` values that make sense for a dense bf16 model (not `fp8_inc`, which is
Gaudi-only, nor `fp8_ds_mla`); tests check they are all still in vLLM's `CacheDType`."""
DEFAULT_BASELINES = ("auto", "fp8", "int4_per_token_head")
"""Measured in every invocation (style rule 15): bf16, vLLM's 2x and vLLM's 4x KV cache."""
BF16_LABEL = "auto"
"""The configuration every ratio is taken against: the model's own dtype, bf16."""


class ConfigSpecError(ValueError):
    """A `--configs` entry is malformed or names an unknown baseline or method."""


@dataclass(frozen=True)
class BenchConfig:
    label: str
    """Canonical short name: `auto`, `fp8`, `gear`, `gear:bits=2`; used in tables and file names."""
    spec: str
    """What the user typed."""
    kv_cache_dtype: str
    """vLLM `kv_cache_dtype`; `auto` for plugin methods, whose pages hold their own codes."""
    method_settings: dict[str, Any] | None = None
    """Resolved `{"method": ..., **all fields}` of a plugin method (defaults filled in), or None."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """The settings the user gave explicitly (they make up the label)."""

    @property
    def is_baseline(self) -> bool:
        return self.method_settings is None

    @property
    def display_name(self) -> str:
        return "bf16 (auto)" if self.label == BF16_LABEL else self.label

    @property
    def slug(self) -> str:
        """The label as a file-name fragment: `gear:bits=2` -> `gear-bits2`."""
        return re.sub(r"[^A-Za-z0-9_.]+", "-", self.label.replace("=", "")).strip("-")

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "spec": self.spec,
            "kv_cache_dtype": self.kv_cache_dtype,
            "method_settings": self.method_settings,
            "overrides": self.overrides,
            "kind": "baseline" if self.is_baseline else "plugin",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchConfig":
        return cls(
            label=data["label"],
            spec=data["spec"],
            kv_cache_dtype=data["kv_cache_dtype"],
            method_settings=data.get("method_settings"),
            overrides=data.get("overrides") or {},
        )


def split_config_specs(values: Iterable[str]) -> list[str]:
    """Split arguments on commas outside braces: `auto,gear:{"bits":2,"rank":0}` -> 2 specs."""
    specs: list[str] = []
    for value in values:
        depth, start = 0, 0
        for i, char in enumerate(value):
            depth += {"{": 1, "}": -1}.get(char, 0)
            if char == "," and depth == 0:
                specs.append(value[start:i])
                start = i + 1
        specs.append(value[start:])
    return [s.strip() for s in specs if s.strip()]


def _allowed_names() -> str:
    plugin = ", ".join(sorted(m.name for m in method_table()))
    return (
        f"vLLM kv_cache_dtype baselines {', '.join(BASELINE_KV_CACHE_DTYPES)}; "
        f'or plugin methods {plugin}, optionally with JSON settings, e.g. gear:{{"bits": 2}}'
    )


def _label(name: str, overrides: dict[str, Any]) -> str:
    if not overrides:
        return name
    return name + ":" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def parse_config_spec(spec: str) -> BenchConfig:
    """One `--configs` entry -> a validated `BenchConfig`.

    Raises:
        ConfigSpecError: unknown name (the allowed ones are listed), settings on a baseline,
            settings that are not a JSON object, or settings the method rejects.
        MethodNotImplementedError: the method is registered but planned, not implemented, or not
            enabled in vLLM yet (`config.check_enabled_in_vllm`).
    """
    name, sep, raw_settings = spec.strip().partition(":")
    name = name.strip()
    if sep and not raw_settings.strip():
        raise ConfigSpecError(
            f"--configs {spec!r}: nothing after ':'; write e.g. {name}:{{\"bits\": 2}} or just {name}"
        )
    if name in BASELINE_KV_CACHE_DTYPES:
        if sep:
            raise ConfigSpecError(
                f"--configs {spec!r}: vLLM baseline {name!r} takes no settings; write just {name}"
            )
        return BenchConfig(label=name, spec=spec, kv_cache_dtype=name)
    if name not in {m.name for m in method_table()}:
        raise ConfigSpecError(f"--configs {spec!r}: {name!r} is unknown; allowed: {_allowed_names()}")
    overrides: dict[str, Any] = {}
    if sep:
        try:
            overrides = json.loads(raw_settings)
        except json.JSONDecodeError as e:
            raise ConfigSpecError(
                f"--configs {spec!r}: settings are not valid JSON ({e.msg}); "
                f'write them as a JSON object, e.g. {name}:{{"bits": 2}}'
            ) from None
        if not isinstance(overrides, dict):
            raise ConfigSpecError(
                f"--configs {spec!r}: settings must be a JSON object, got {type(overrides).__name__}; "
                f'e.g. {name}:{{"bits": 2}}'
            )
        if "method" in overrides:
            raise ConfigSpecError(f"--configs {spec!r}: the method is the name before ':'; drop \"method\"")
    try:
        method_config = load_method_config({"method": name, **overrides})
        check_enabled_in_vllm(method_config)  # the bench runs vLLM: refuse before any engine starts
    except KVCompressionConfigError as e:
        raise ConfigSpecError(f"--configs {spec!r}: {e}") from None
    except MethodNotImplementedError as e:
        raise MethodNotImplementedError(f"--configs {spec!r}: {e}") from None
    return BenchConfig(
        label=_label(name, overrides),
        spec=spec,
        kv_cache_dtype="auto",
        method_settings=method_config.to_dict(),
        overrides=overrides,
    )


def resolve_configs(
    config_args: Iterable[str], baselines: Iterable[str] = DEFAULT_BASELINES
) -> list[BenchConfig]:
    """Baselines first, then `--configs`, each label once (a repeated label is dropped)."""
    configs: list[BenchConfig] = []
    for spec in [*baselines, *split_config_specs(config_args)]:
        config = parse_config_spec(spec)
        if config.label not in {c.label for c in configs}:
            configs.append(config)
    if not configs:
        raise ConfigSpecError("no configuration to run: give --configs or keep the default --baselines")
    return configs


@dataclass(frozen=True)
class EngineOptions:
    """vLLM settings shared by every configuration of one benchmark invocation."""

    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    """Fixed explicitly: vLLM's default differs between `LLM` (16384) and `vllm serve` (8192)."""
    seed: int = 0
    enforce_eager: bool = False
    """False keeps vLLM's CUDA graphs and torch.compile, i.e. what production serving runs."""
    enable_prefix_caching: bool | None = None
    """None keeps vLLM's default (on); plugin methods that evict turn it off themselves."""
    tensor_parallel_size: int = 1
    kv_cache_memory_bytes: int | None = None
    """None: vLLM sizes the KV cache from `gpu_memory_utilization` by profiling. A number gives
    every configuration exactly these KV bytes, e.g. to keep a workload as memory-bound on a
    larger GPU as on the one it was sized for."""


def engine_settings(
    config: BenchConfig, *, model_dir: str, max_model_len: int, options: EngineOptions
) -> dict[str, Any]:
    """The `vllm.engine.arg_utils.EngineArgs` fields for one configuration on one engine."""
    settings: dict[str, Any] = {
        "model": model_dir,
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "max_model_len": max_model_len,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "max_num_seqs": options.max_num_seqs,
        "max_num_batched_tokens": options.max_num_batched_tokens,
        "seed": options.seed,
        "enforce_eager": options.enforce_eager,
        "tensor_parallel_size": options.tensor_parallel_size,
        "kv_cache_dtype": config.kv_cache_dtype,
    }
    if options.enable_prefix_caching is not None:
        settings["enable_prefix_caching"] = options.enable_prefix_caching
    if options.kv_cache_memory_bytes is not None:
        settings["kv_cache_memory_bytes"] = options.kv_cache_memory_bytes
    if config.method_settings is not None:
        settings["additional_config"] = {ADDITIONAL_CONFIG_KEY: dict(config.method_settings)}
    return settings


def offline_engine_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """`vllm.LLM(**kwargs)`: the settings plus per-request timing, which `LLM` turns off by default
    (`disable_log_stats=True`) and without which `RequestOutput.metrics` is None."""
    return {**settings, "disable_log_stats": False}


SERVED_MODEL_NAME = "bench"


def serve_argv(settings: dict[str, Any], *, port: int, host: str = "127.0.0.1") -> list[str]:
    """`vllm serve` arguments (after `vllm serve`) for the same settings; plugin settings go
    through the plugin's own `--kv-compression` flags, as a user would type them."""
    argv = [str(settings["model"])]
    for name, value in settings.items():
        if name in ("model", "additional_config"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    method_settings = (settings.get("additional_config") or {}).get(ADDITIONAL_CONFIG_KEY)
    if method_settings is not None:
        fields = {k: v for k, v in method_settings.items() if k != "method"}
        argv += [
            "--kv-compression",
            method_settings["method"],
            "--kv-compression-config",
            json.dumps(fields, sort_keys=True),
        ]
    argv += [
        "--served-model-name",
        SERVED_MODEL_NAME,
        "--host",
        host,
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    return argv
